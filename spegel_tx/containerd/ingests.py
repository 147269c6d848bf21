"""Downloads containerd has in progress, read from its content directory's ``ingest/``.

What this relies on, as seen on Debian's containerd 1.6.20 (``../shared/WIRE.md``,
"Downloads in progress") and in containerd's local content store:

- each download is a directory ``ingest/<hash of its ref>/`` holding ``ref``
  (``<namespace>/<sequence>/<key>``; the pull code's key is a ``layer-``,
  ``config-``, ``manifest-`` or ``index-`` prefix before the digest), ``total``
  (the expected size, in decimal; absent when the writer did not say) and
  ``data``, which grows as bytes arrive;
- on commit ``data`` is renamed into ``blobs/sha256/`` (same inode), so a reader
  that opened ``data`` reads the same bytes through to the end;
- a cancelled download is removed (``data`` loses its last link), a failed one
  stays behind and stops growing.

So a blob being downloaded is served by following ``data`` through one open
descriptor until ``total`` bytes, and given up on when it stops growing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from spegel_tx.errors import SpegelError
from spegel_tx.interfaces import IBlob

MAX_READ = 1024 * 1024
"""The most one read returns, as for committed blobs."""

FOLLOW_INTERVAL = 0.02
"""Seconds between looks at a ``data`` file that has no new bytes yet. containerd
writes about 1 MiB at a time, so this adds at most 20 ms to each megabyte."""

_HEX = re.compile(r"^[0-9a-f]{64}$")
_REF_KEY_DIGEST = re.compile(r"^(?:[a-z]+-)?(sha256:[0-9a-f]{64})$")


class IngestEnded(SpegelError):
    """A download being followed stopped before its end: stalled, or cancelled."""


@dataclass(frozen=True)
class Ingest:
    """One download in progress, as its files say now."""

    digest: str
    total: int
    """The size the finished blob will have."""
    received: int
    """Bytes in ``data`` now."""
    updated: float
    """When ``data`` last grew (its mtime, seconds since the epoch)."""
    path: str
    """The ingest's directory."""

    def live(self, now: float, stall_timeout: float) -> bool:
        """Grew within ``stall_timeout``. A complete download is committed within
        milliseconds; one still here after that failed its digest check, or was
        abandoned on its last byte, and is not offered either."""
        return now - self.updated < stall_timeout


def ingest_digest(ref: str, namespace: str) -> str | None:
    """The digest a download of ``namespace`` is for, from its ingest ``ref``; None for
    another namespace's download or a ref that names no digest (ctr's own imports)."""
    owner, _, rest = ref.strip().partition("/")
    _, _, key = rest.partition("/")
    if owner != namespace:
        return None
    found = _REF_KEY_DIGEST.match(key)
    return found.group(1) if found else None


def scan_ingests(content_path: str, namespace: str) -> dict[str, Ingest]:
    """Blocking: every download of ``namespace`` under ``content_path`` with a known size,
    by digest (the furthest along if two are for the same digest)."""
    found: dict[str, Ingest] = {}
    root = os.path.join(content_path, "ingest")
    try:
        entries = os.listdir(root)
    except OSError:
        return found
    for entry in entries:
        path = os.path.join(root, entry)
        try:
            with open(os.path.join(path, "ref")) as f:
                digest = ingest_digest(f.read(), namespace)
            if digest is None:
                continue
            with open(os.path.join(path, "total")) as f:
                total = int(f.read().strip())
            stat = os.stat(os.path.join(path, "data"))
        except (OSError, ValueError):
            continue  # being created or removed right now, or no size given
        ingest = Ingest(digest, total, stat.st_size, stat.st_mtime, path)
        if total > 0 and (digest not in found or found[digest].received < ingest.received):
            found[digest] = ingest
    return found


def blob_files(content_path: str) -> set[str]:
    """Blocking: the digests of the files in ``blobs/sha256/`` (about a millisecond for a
    thousand)."""
    try:
        names = os.listdir(os.path.join(content_path, "blobs", "sha256"))
    except OSError:
        return set()
    return {"sha256:" + name for name in names if _HEX.match(name)}


def open_data(ingest: Ingest) -> int:
    """Blocking: a descriptor on the ingest's ``data``, which survives its commit."""
    return os.open(os.path.join(ingest.path, "data"), os.O_RDONLY | os.O_CLOEXEC)


@implementer(IBlob)
class GrowingBlob:
    """A blob still being written: reads wait for its bytes, and fail with IngestEnded
    once ``data`` has not grown for ``stall_timeout`` or was removed unfinished.

    ``fileno`` is None: sendfile would stop at the bytes written so far.
    """

    def __init__(self, clock: Any, fd: int, size: int, stall_timeout: float) -> None:
        self._clock = clock
        self._fd: int | None = fd
        self.size = size
        self._stall_timeout = stall_timeout
        self._seen = -1
        self._grew_at = clock.seconds()
        self._waiting: Deferred[bytes] | None = None
        self._timer: Any = None

    def fileno(self) -> int | None:
        return None

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if self._fd is None:
            return fail(ValueError("read from a closed blob"))
        if offset >= self.size or length <= 0:
            return succeed(b"")
        try:
            data = self._try_read(offset, length)
        except (OSError, IngestEnded):
            return fail()
        if data:
            return succeed(data)
        self._waiting = Deferred(lambda _: self._stop_waiting())
        self._timer = self._clock.callLater(FOLLOW_INTERVAL, self._look, offset, length)
        return self._waiting

    def _try_read(self, offset: int, length: int) -> bytes:
        """The bytes at ``offset`` if written yet; b"" to wait; IngestEnded to give up."""
        assert self._fd is not None
        stat = os.fstat(self._fd)
        now = self._clock.seconds()
        if stat.st_size > self._seen:
            self._seen = stat.st_size
            self._grew_at = now
        if offset < stat.st_size:
            return os.pread(self._fd, min(length, stat.st_size - offset, MAX_READ), offset)
        if stat.st_nlink == 0:
            raise IngestEnded(f"the download was cancelled at {stat.st_size} of {self.size} bytes")
        if now - self._grew_at >= self._stall_timeout:
            raise IngestEnded(
                f"the download stalled at {stat.st_size} of {self.size} bytes "
                f"(no growth for {self._stall_timeout:g} s)"
            )
        return b""

    def _look(self, offset: int, length: int) -> None:
        self._timer = None
        waiting = self._waiting
        if waiting is None or self._fd is None:
            return
        try:
            data = self._try_read(offset, length)
        except (OSError, IngestEnded) as e:
            self._waiting = None
            waiting.errback(e)
            return
        if data:
            self._waiting = None
            waiting.callback(data)
        else:
            self._timer = self._clock.callLater(FOLLOW_INTERVAL, self._look, offset, length)

    def _stop_waiting(self) -> None:
        self._waiting = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def close(self) -> None:
        self._stop_waiting()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
