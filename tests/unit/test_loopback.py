"""Per-run loopback addresses: no two processes on the machine hold the same block."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import random
import signal
import socket
import subprocess
import sys

import pytest

from tests.support import loopback
from tests.support.processes import ROOT

CLAIM = (
    "from tests.support.loopback import loopback_host; print(loopback_host(), flush=True); input()"
)


def block_of(host: str) -> str:
    return host.rsplit(".", 1)[0]


@pytest.fixture
def other_run():
    """Another process that has claimed a block, as a second test run would; killed by PID."""
    process = subprocess.Popen(
        [sys.executable, "-c", CLAIM],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        yield process, process.stdout.readline().strip()
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(10)


def test_addresses_are_distinct_bindable_and_not_the_machines():
    hosts = loopback.loopback_hosts(300)  # more than one block holds
    assert len(set(hosts)) == 300
    for host in hosts:
        address = ipaddress.IPv4Address(host)
        assert address.is_loopback and not host.startswith("127.0.")
        assert host.rsplit(".", 1)[1] not in ("0", "255")
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind((hosts[0], 0))
        udp.bind((hosts[-1], 0))


def test_a_block_is_held_by_one_process_until_it_dies(other_run):
    process, host = other_run
    lock_file = loopback.LOCK_DIR / f"{block_of(host)}.lock"
    with open(lock_file, "ab") as lock:
        with pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the process
        fcntl.flock(lock, fcntl.LOCK_UN)


class Draws:
    """Random draws whose first two name ``first``'s block."""

    def __init__(self, first: str) -> None:
        _, a, b = first.split(".")
        self.numbers = [int(a), int(b)]
        self.rest = random.SystemRandom()

    def randint(self, low: int, high: int) -> int:
        return self.numbers.pop(0) if self.numbers else self.rest.randint(low, high)


def test_a_block_another_run_holds_is_drawn_again(other_run):
    _, host = other_run
    taken = block_of(host)
    draws = Draws(taken)
    claimed = loopback._claim_block(draws)  # type: ignore[arg-type]
    assert draws.numbers == [], "the held block was drawn first"
    assert claimed != taken
    lock_file = loopback.LOCK_DIR / f"{claimed}.lock"
    with open(lock_file, "ab") as lock, pytest.raises(BlockingIOError):
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # this process holds it now
