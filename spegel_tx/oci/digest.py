"""Content digests as the OCI image spec defines them."""

from __future__ import annotations

import re

from spegel_tx.errors import InvalidDigest

_ENCODED_LENGTH = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+")


def parse_digest(value: str) -> str:
    """Return ``value`` if it is a digest we can verify, else raise InvalidDigest.

    Only registered algorithms are accepted: a digest we could not verify is
    as useless to a mirror as a malformed one.
    """
    algorithm, sep, encoded = value.partition(":")
    if not sep:
        raise InvalidDigest(f"{value!r} is not of the form algorithm:hex")
    expected = _ENCODED_LENGTH.get(algorithm)
    if expected is None:
        raise InvalidDigest(f"unsupported digest algorithm {algorithm!r}")
    if len(encoded) != expected or not _HEX.fullmatch(encoded):
        raise InvalidDigest(f"{algorithm} digest must be {expected} lowercase hex characters")
    return value


def is_digest(value: str) -> bool:
    try:
        parse_digest(value)
    except InvalidDigest:
        return False
    return True
