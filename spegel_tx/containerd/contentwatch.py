"""Hears a download start or end in containerd's content directory, through inotify.

containerd 1.6 to 2.0 send no event when a blob is committed, and polling its
API for every pull would load it; the kernel says the moment an ingest
directory appears or goes (a download starting, or committed and cleaned up)
and the moment a blob is renamed into ``blobs/sha256``. What changed is not
read from the event: the listener rescans, so a missed or merged event costs
nothing but a later rescan.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from twisted.internet import inotify
from twisted.logger import Logger
from twisted.python.filepath import FilePath

log = Logger()

_HEX = re.compile(r"^[0-9a-f]{64}$")
_MASK = inotify.IN_CREATE | inotify.IN_DELETE | inotify.IN_MOVED_TO | inotify.IN_MOVED_FROM


class ContentWatcher:
    """Calls ``changed(digest)`` in the reactor thread whenever ``ingest/`` or
    ``blobs/sha256/`` under ``content_path`` gains or loses an entry: ``digest`` names
    a blob that arrived in ``blobs/``, and is None for a change under ``ingest/``."""

    def __init__(
        self, reactor: Any, content_path: str, changed: Callable[[str | None], None]
    ) -> None:
        self._reactor = reactor
        self._content_path = content_path
        self._changed = changed
        self._notifier: inotify.INotify | None = None

    @property
    def watching(self) -> bool:
        return self._notifier is not None

    def start(self) -> bool:
        """Watch both directories; False (and a log line saying why) when that cannot be."""
        paths = [
            os.path.join(self._content_path, "ingest"),
            os.path.join(self._content_path, "blobs", "sha256"),
        ]
        try:
            notifier = inotify.INotify(self._reactor)
            notifier.startReading()
        except Exception as e:
            log.warn(
                "No inotify here ({error}): blobs are advertised with their image, "
                "not as they land",
                error=e,
            )
            return False
        try:
            for path in paths:
                notifier.watch(FilePath(path), mask=_MASK, callbacks=[self._event])
        except Exception as e:
            notifier.loseConnection()
            log.warn(
                "Cannot watch containerd's content directory {path} ({error}): blobs are "
                "advertised with their image, not as they land",
                path=self._content_path,
                error=e,
            )
            return False
        self._notifier = notifier
        return True

    def stop(self) -> None:
        if self._notifier is not None:
            notifier, self._notifier = self._notifier, None
            notifier.loseConnection()

    def _event(self, _watch: Any, path: FilePath[Any], mask: int) -> None:
        name = path.basename()
        arrived = mask & (inotify.IN_CREATE | inotify.IN_MOVED_TO)
        in_blobs = path.parent().basename() == "sha256"
        if arrived and in_blobs and _HEX.match(name):
            self._changed("sha256:" + name)
        else:
            self._changed(None)
