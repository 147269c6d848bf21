"""Basic authentication between containerd and the registry, and between peers.

As in Spegel, one username and password, each read from a file of a mounted Secret,
guard every ``/v2/`` request. ``spegel-tx configuration`` writes them into each
hosts.toml as an ``Authorization`` header, so containerd sends them; a node sends
them with every request it forwards to a peer.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred

from spegel_tx.errors import ConfigError

DEFAULT_DIRECTORY = "/etc/secrets/basic-auth"
"""Where Spegel's chart mounts the ``basicAuthSecretName`` Secret."""
DEFAULT_USERNAME_FILE = f"{DEFAULT_DIRECTORY}/username"
DEFAULT_PASSWORD_FILE = f"{DEFAULT_DIRECTORY}/password"
REALM = b"spegel-tx"


@dataclass(frozen=True)
class BasicAuth:
    username: bytes
    password: bytes

    def header(self) -> bytes:
        """The ``Authorization`` value that carries these credentials."""
        return b"Basic " + base64.b64encode(self.username + b":" + self.password)

    def admits(self, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` header holds these credentials, compared in
        constant time (both parts always compared, so timing tells nothing)."""
        given = _credentials(authorization)
        if given is None:
            return False
        username_matches = hmac.compare_digest(given[0], self.username)
        password_matches = hmac.compare_digest(given[1], self.password)
        return username_matches & password_matches


def _credentials(authorization: bytes | None) -> tuple[bytes, bytes] | None:
    if authorization is None:
        return None
    scheme, _, encoded = authorization.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    username, colon, password = decoded.partition(b":")
    return (username, password) if colon else None


def read_basic_auth(username_file: str, password_file: str) -> BasicAuth | None:
    """The credentials in these files, or None when both are empty (no authentication).

    Spegel's paths (``/etc/secrets/basic-auth/...``) may be missing: the Secret is not
    mounted, and authentication is off. Any other path must exist: a typo must not
    silently leave the registry open. A final line ending is not part of a value.
    """
    username = _read(username_file, DEFAULT_USERNAME_FILE, "basic-auth-username-file")
    password = _read(password_file, DEFAULT_PASSWORD_FILE, "basic-auth-password-file")
    if b":" in username:
        raise ConfigError(
            "basic-auth-username-file",
            f"{username_file} holds a ':', which Basic authentication cannot carry in a username",
        )
    if not username and not password:
        return None
    return BasicAuth(username, password)


def _read(path: str, default: str, key: str) -> bytes:
    if not path:
        return b""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        if path == default:
            return b""
        raise ConfigError(key, f"{path} does not exist: {_REMEDY}") from e
    except OSError as e:
        raise ConfigError(
            key, f"cannot read {path}: {e.strerror} (uid {os.getuid()}): {_REMEDY}"
        ) from e
    return data.removesuffix(b"\n").removesuffix(b"\r")


_REMEDY = "point it at the Secret's file, or leave it empty for no authentication"


class AuthorizedClient:
    """A treq-like client that sends the credentials with every request: what a node
    uses to reach its peers, whose registries ask for them."""

    def __init__(self, client: Any, auth: BasicAuth) -> None:
        self._client = client
        self._header = auth.header()

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        headers = dict(kwargs.pop("headers", None) or {})
        headers[b"authorization"] = [self._header]
        return self._client.request(method, url, headers=headers, **kwargs)
