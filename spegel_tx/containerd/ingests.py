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
descriptor until ``total`` bytes, and given up on when it stops growing
(``store.GrowingBlob``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_HEX = re.compile(r"^[0-9a-f]{64}$")
_REF_KEY_DIGEST = re.compile(r"^(?:[a-z]+-)?(sha256:[0-9a-f]{64})$")


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
