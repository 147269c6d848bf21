"""Loopback addresses of this run's own, so two test runs on one machine never meet.

Linux routes all of 127.0.0.0/8 to ``lo``, so any 127.a.b.c can be bound with no
set-up. A run claims a block of 254 addresses, 127.a.b.1 to 127.a.b.254, with ``a``
and ``b`` drawn at random (127.0.x.x stays the machine's: 127.0.0.1, 127.0.1.1), by
holding an exclusive ``flock`` on ``/tmp/spegel-tx-loopback/127.a.b.lock`` for as long
as the process lives; another run that draws the same block finds it locked and draws
again. The kernel drops the lock when the process ends, even by SIGKILL.

Every call to ``loopback_host`` hands out an address not handed out before in this
process (a further block is claimed when one runs out). Ports on it come from the
kernel (``free_ports``): nothing else on the machine binds there, and outgoing
connections to loopback leave from 127.0.0.1, so a port found free stays free.
"""

from __future__ import annotations

import fcntl
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

LOCK_DIR = Path("/tmp/spegel-tx-loopback")
_lock = threading.Lock()
_held: list[IO[bytes]] = []
_hosts: Iterator[str] | None = None


def loopback_host() -> str:
    """An IPv4 loopback address that no other run uses and this run has not handed out."""
    global _hosts
    with _lock:
        if _hosts is None:
            _hosts = _addresses()
        return next(_hosts)


def loopback_hosts(count: int) -> list[str]:
    """``count`` distinct addresses from ``loopback_host``."""
    return [loopback_host() for _ in range(count)]


def _addresses() -> Iterator[str]:
    while True:
        prefix = _claim_block()
        for last in range(1, 255):
            yield f"{prefix}.{last}"


def _claim_block(draw: random.Random | None = None) -> str:
    """Lock a free block 127.a.b.0/24 for this process and return ``127.a.b``."""
    LOCK_DIR.mkdir(exist_ok=True)
    if LOCK_DIR.stat().st_uid == os.getuid():
        LOCK_DIR.chmod(0o1777)  # Runs as other users may claim blocks too.
    draw = draw or random.SystemRandom()
    for _ in range(1000):
        prefix = f"127.{draw.randint(1, 254)}.{draw.randint(0, 255)}"
        lock = open(LOCK_DIR / f"{prefix}.lock", "ab")  # noqa: SIM115 (held until exit)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        _held.append(lock)
        return prefix
    raise RuntimeError(f"no free loopback block after 1000 draws; see {LOCK_DIR}")
