"""Give memory back after connections are cut off.

A request cut off mid-body leaves reference cycles behind (an exception's
traceback holds the frame that holds the relay, its buffers and the client's
unsent data). Python's cycle collector runs on object counts, not bytes, so a
few such cycles can keep hundreds of MiB for a long time; glibc then keeps the
freed pages too. After cut-off requests, once the burst is over, one collection
and a ``malloc_trim`` return them: measured here, 100 slow readers that left took
a node from 400 MiB back to its 78 MiB (bench/slow_clients.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from typing import Any

RECLAIM_DELAY = 1.0
"""Seconds after the last cut-off request: a burst of them costs one collection."""


def _malloc_trim() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)``, or nothing where the C library has none."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return (lambda: trim(0)) if trim is not None else (lambda: None)


class Reclaimer:
    def __init__(self, clock: Any, trim: Callable[[], object] | None = None) -> None:
        self._clock = clock
        self._trim = trim or _malloc_trim()
        self._call: Any = None
        self.runs = 0

    def soon(self) -> None:
        if self._call is not None and self._call.active():
            self._call.reset(RECLAIM_DELAY)
        else:
            self._call = self._clock.callLater(RECLAIM_DELAY, self._run)

    def _run(self) -> None:
        self._call = None
        self.runs += 1
        gc.collect()
        self._trim()
