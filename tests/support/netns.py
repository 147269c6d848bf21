"""Two network namespaces joined by a veth pair: two hosts of an IPv6-only or a
dual-stack network, made by the test and removed after it.

Each namespace is named for this process and a random draw, so copies of the
suite running at once never meet; inside one, ports are private, so nodes use
the chart's own (5000, 5001, 9090). Processes run in it through ``ip netns
exec`` (the PID is the process's own: ``ip`` execs it), which also puts
``/etc/netns/NAME/hosts`` in place of ``/etc/hosts`` for them: the bootstrap
name a test writes there is what a headless Service's A and AAAA records are in a
cluster. The test process itself reaches into a namespace with ``call``, which
runs a function in a thread moved there by setns(2).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
ETC_NETNS = Path("/etc/netns")


@dataclass(frozen=True)
class Namespace:
    name: str
    ipv4: str | None
    ipv6: str

    @property
    def wrapper(self) -> list[str]:
        """Put before a command to run it in this namespace."""
        return ["ip", "netns", "exec", self.name]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.wrapper, *args], capture_output=True, text=True, timeout=timeout
        )

    def call(self, function: Callable[[], T]) -> T:
        """``function()`` run with this namespace's network (its sockets stay there)."""
        outcome: list[T] = []
        error: list[BaseException] = []

        def inside() -> None:
            try:
                with open(f"/run/netns/{self.name}") as handle:
                    libc = ctypes.CDLL(None, use_errno=True)
                    if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                outcome.append(function())
            except BaseException as e:
                error.append(e)

        thread = threading.Thread(target=inside)
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return outcome[0]


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@contextmanager
def linked_pair(dual_stack: bool, hosts: dict[str, list[str]]) -> Iterator[tuple[Namespace, ...]]:
    """Namespaces a and b on one link: ``fd00:<random>::1`` and ``::2``, and with
    ``dual_stack`` also ``10.<random>.1`` and ``.2``. ``hosts`` (name to addresses)
    is their /etc/hosts; addresses ``{a4}``, ``{a6}``, ``{b4}`` and ``{b6}`` are
    filled in. Skips when this machine does not allow network namespaces."""
    if shutil.which("ip") is None:
        pytest.skip("needs ip (apt-get install iproute2)")
    tag = f"sx{os.getpid()}{secrets.token_hex(3)}"
    draw = secrets.randbelow(1 << 16)
    prefix6 = f"fd00:{draw:x}:{secrets.randbelow(1 << 16):x}:"
    prefix4 = f"10.{draw >> 8}.{draw & 0xFF}."
    a = Namespace(f"{tag}a", f"{prefix4}1" if dual_stack else None, f"{prefix6}:1")
    b = Namespace(f"{tag}b", f"{prefix4}2" if dual_stack else None, f"{prefix6}:2")
    names = {"a4": a.ipv4, "a6": a.ipv6, "b4": b.ipv4, "b6": b.ipv6}
    with ExitStack() as cleanup:
        try:
            _ip("netns", "add", a.name)
        except RuntimeError as e:
            pytest.skip(f"network namespaces are not permitted here: {e}")
        cleanup.callback(_ip, "netns", "del", a.name)
        _ip("netns", "add", b.name)
        cleanup.callback(_ip, "netns", "del", b.name)
        _ip(
            "link",
            "add",
            "veth0",
            "netns",
            a.name,
            "type",
            "veth",
            "peer",
            "name",
            "veth0",
            "netns",
            b.name,
        )
        for namespace in (a, b):
            directory = ETC_NETNS / namespace.name
            directory.mkdir(parents=True)
            cleanup.callback(shutil.rmtree, directory, True)
            lines = [
                f"{address.format(**names)} {name}"
                for name, addresses in hosts.items()
                for address in addresses
                if address.format(**names) != "None"
            ]
            (directory / "hosts").write_text("\n".join(lines) + "\n")
            # Nothing to ask beyond /etc/hosts: no name leaves the namespace.
            (directory / "resolv.conf").write_text("nameserver ::1\n")
            inside = ["ip", "-n", namespace.name]
            subprocess.run([*inside, "link", "set", "lo", "up"], check=True, timeout=30)
            subprocess.run(
                [*inside, "addr", "add", f"{namespace.ipv6}/64", "dev", "veth0", "nodad"],
                check=True,
                timeout=30,
            )
            if namespace.ipv4 is not None:
                subprocess.run(
                    [*inside, "addr", "add", f"{namespace.ipv4}/24", "dev", "veth0"],
                    check=True,
                    timeout=30,
                )
            subprocess.run([*inside, "link", "set", "veth0", "up"], check=True, timeout=30)
        yield a, b
