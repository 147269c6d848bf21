"""The OCI distribution error body: ``{"errors": [{"code", "message", "detail"}]}``."""

from __future__ import annotations

import json
from enum import Enum


class ErrorCode(Enum):
    """Codes from the distribution spec (which allows no others), each with the HTTP
    status it is sent with here."""

    BLOB_UNKNOWN = ("BLOB_UNKNOWN", 404)
    MANIFEST_UNKNOWN = ("MANIFEST_UNKNOWN", 404)
    NAME_UNKNOWN = ("NAME_UNKNOWN", 404)
    NAME_INVALID = ("NAME_INVALID", 400)
    DIGEST_INVALID = ("DIGEST_INVALID", 400)
    UNAUTHORIZED = ("UNAUTHORIZED", 401)
    UNSUPPORTED = ("UNSUPPORTED", 405)
    SIZE_INVALID = ("SIZE_INVALID", 416)
    """A ``Range`` outside the content: the spec has no code of its own for it."""

    @property
    def status(self) -> int:
        return self.value[1]


def error_body(code: ErrorCode, message: str) -> bytes:
    return json.dumps(
        {"errors": [{"code": code.value[0], "message": message, "detail": None}]}
    ).encode()
