"""The single byte range of an HTTP ``Range`` header (RFC 9110, section 14)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SINGLE = re.compile(r"bytes=(\d*)-(\d*)")
_LARGEST = 1 << 63
"""Positions beyond any content: a longer number is read as this, not parsed (Python
refuses to parse integers of more than 4,300 digits, and nothing needs them)."""
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class RangeNotSatisfiable(Exception):
    """The range lies wholly outside the content: answer 416."""

    def __init__(self, size: int) -> None:
        super().__init__(f"requested range lies outside the {size} bytes of content")
        self.size = size


@dataclass(frozen=True)
class ByteRange:
    """Inclusive first and last byte positions, as ``Content-Range`` writes them."""

    first: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.first}-{self.last}/{size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range to serve, or None to serve the whole content with 200.

    A header we do not understand (other units, several ranges, bad syntax)
    is ignored, as RFC 9110 allows; only a well-formed range that misses the
    content entirely is an error.
    """
    if header is None:
        return None
    match = _SINGLE.fullmatch(header.strip())
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text:
        if not last_text:
            return None
        suffix = _position(last_text)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return ByteRange(max(size - suffix, 0), size - 1)
    first = _position(first_text)
    if last_text and _position(last_text) < first:
        return None
    if first >= size:
        raise RangeNotSatisfiable(size)
    last = min(_position(last_text), size - 1) if last_text else size - 1
    return ByteRange(first, last)


def _position(digits: str) -> int:
    stripped = digits.lstrip("0") or "0"
    return _LARGEST if len(stripped) > 18 else int(stripped)


def content_range(header: str | None) -> ByteRange | None:
    """The range a ``Content-Range: bytes a-b/size`` answer holds, or None when the
    header is missing, not of that form, or ends before it starts."""
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if match is None:
        return None
    first, last = _position(match.group(1)), _position(match.group(2))
    return ByteRange(first, last) if last >= first else None
