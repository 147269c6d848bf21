"""Hears a download start or end in containerd's content directory, through inotify.

containerd 1.6 to 2.0 send no event when a blob is committed, and polling its
API for every pull would load it; the kernel says the moment an ingest
directory appears or goes (a download starting, or committed and cleaned up)
and the moment a blob is renamed into ``blobs/sha256``. What changed is not
read from the event: the listener rescans, so a merged event costs nothing and a
missed one only time until the next rescan.
"""

from __future__ import annotations

import ctypes.util
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from twisted.logger import Logger
from twisted.python.filepath import FilePath

log = Logger()

_DIRECTORIES = (("ingest",), ("blobs",), ("blobs", "sha256"))


def _load_inotify() -> ModuleType:
    """Twisted's inotify module, which finds libc with ``ctypes.util.find_library``: that
    needs ldconfig or a compiler, and a minimal image (ours) has neither. glibc's soname
    is fixed, so the search is told it when it finds nothing, for this import only."""
    find_library = ctypes.util.find_library

    def find(name: str) -> str | None:
        return find_library(name) or ("libc.so.6" if name == "c" else None)

    ctypes.util.find_library = find
    try:
        from twisted.internet import inotify
    finally:
        ctypes.util.find_library = find_library
    return inotify


inotify: ModuleType | None
try:
    inotify = _load_inotify()
except (ImportError, OSError) as e:
    inotify, _MISSING = None, str(e)


class ContentWatcher:
    """Calls ``changed()`` in the reactor thread whenever an entry appears in or leaves
    ``ingest/`` or ``blobs/sha256/`` under ``content_path``: a download starting or
    ending, a blob committed. Writes to files are not heard."""

    def __init__(self, reactor: Any, content_path: str, changed: Callable[[], None]) -> None:
        self._reactor = reactor
        self._content_path = content_path
        self._changed = changed
        self._notifier: Any = None
        self._watched: set[str] = set()

    @property
    def watching(self) -> bool:
        return self._notifier is not None

    def start(self) -> bool:
        """Watch the content directory, and the directories under it as they appear (a
        fresh containerd makes ``ingest/`` and ``blobs/sha256/`` at its first download);
        False, and a log line saying why, when that cannot be."""
        try:
            if inotify is None:
                raise ImportError(_MISSING)
            notifier = inotify.INotify(self._reactor)
            notifier.startReading()
        except Exception as e:
            log.warn(
                "No inotify here ({error}): blobs are advertised with their image, "
                "not as they land",
                error=e,
            )
            return False
        self._notifier = notifier
        try:
            self._watch(self._content_path)
            self._watch_new_directories()
        except Exception as e:
            self.stop()
            log.warn(
                "Cannot watch containerd's content directory {path} ({error}): blobs are "
                "advertised with their image, not as they land",
                path=self._content_path,
                error=e,
            )
            return False
        return True

    def _watch(self, path: str) -> None:
        assert self._notifier is not None and inotify is not None
        mask = inotify.IN_CREATE | inotify.IN_DELETE | inotify.IN_MOVED_TO | inotify.IN_MOVED_FROM
        self._notifier.watch(FilePath(path), mask=mask, callbacks=[self._event])
        self._watched.add(path)

    def _watch_new_directories(self) -> None:
        """Watch those of ``ingest/``, ``blobs/`` and ``blobs/sha256/`` that exist now; what
        happened in one before its watch began is found by the rescan this asks for."""
        added = False
        for parts in _DIRECTORIES:
            path = os.path.join(self._content_path, *parts)
            if path not in self._watched and os.path.isdir(path):
                self._watch(path)
                added = True
        if added:
            self._changed()

    def stop(self) -> None:
        if self._notifier is not None:
            notifier, self._notifier = self._notifier, None
            notifier.loseConnection()
        self._watched.clear()

    def _event(self, _watch: Any, _path: FilePath[Any], mask: int) -> None:
        if self._notifier is None:
            return
        assert inotify is not None
        if mask & inotify.IN_ISDIR and mask & (inotify.IN_CREATE | inotify.IN_MOVED_TO):
            self._watch_new_directories()
        self._changed()
