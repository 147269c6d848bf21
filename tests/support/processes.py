"""Start long-running processes with their output in a file, wait for them, stop them by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def free_port(host: str) -> int:
    """A TCP port nothing listens on right now at ``host`` (take ``host`` from
    ``loopback_host()``: then nothing else on the machine can take the port either)."""
    return free_ports(host, 1)[0]


def rss(pid: int) -> int:
    """The resident set of process ``pid`` in bytes, as ``/proc`` reports it."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def free_ports(host: str, count: int) -> list[int]:
    """``count`` distinct ports free at ``host`` for both TCP and UDP.

    The sockets stay bound until all are chosen: the kernel may otherwise hand the
    same port out twice in a row.
    """
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            tcp = socket.socket()
            tcp.bind((host, 0))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, tcp.getsockname()[1]))
                except OSError:
                    tcp.close()
                    continue
            held.append(tcp)
        return [int(sock.getsockname()[1]) for sock in held]
    finally:
        for sock in held:
            sock.close()


def start_process(
    args: Sequence[str],
    log_path: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(args),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )


def log_tail(log_path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for_http(
    url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 20.0
) -> None:
    """Return once ``url`` answers 200; fail with the log's tail if the process dies or stalls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args[0]} exited with {process.returncode}:\n{log_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s:\n{log_tail(log_path)}")


def stop_process(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM by PID, SIGKILL after ``grace`` seconds; always reaps the child."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(grace)


def kill_process(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL by PID: the process gets no chance to clean up, as in a crash."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)


def poll(check: Callable[[], T], timeout: float = 30.0, interval: float = 0.2) -> T:
    """``check()`` until it returns something true or ``timeout`` passes; its last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


def _spegel_code() -> tuple[dict[str, str], Path]:
    """The environment and working directory of a spegel-tx process a helper starts.

    By default the working tree's code (``PYTHONPATH``), as the tests want. With
    ``SPEGEL_TX_CODE=installed``, which the demo sets, whatever this interpreter has
    installed, run from outside the tree so that nothing in it shadows the install.
    """
    code = os.environ.get("SPEGEL_TX_CODE", "tree")
    if code == "tree":
        return {**os.environ, "PYTHONPATH": str(ROOT)}, ROOT
    if code == "installed":
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        return env, Path("/")
    raise ValueError(f"SPEGEL_TX_CODE={code!r}: expected 'tree' or 'installed'")


def spegel_tx_cli(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The ``spegel-tx`` command line, as the console script runs it."""
    environment, cwd = _spegel_code()
    return subprocess.run(
        [sys.executable, "-m", "spegel_tx.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**environment, **(env or {})},
    )


def start_spegel(
    keys: Mapping[str, Any], workdir: Path, wrapper: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], Path]:
    """``twistd -n spegel`` with ``keys`` as its node.yaml in ``workdir``; its log, one
    JSON object per line, is the returned path. ``wrapper`` runs it inside something,
    as ``ip netns exec NAME``."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "node.yaml"
    config.write_text(yaml.safe_dump(dict(keys), sort_keys=False))
    log_path = workdir / "spegel.log"
    twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    logger = ["--logger", "spegel_tx.logs.json_observer"]
    environment, _ = _spegel_code()
    process = start_process(
        [*wrapper, *twistd, "-n", "--pidfile=", *logger, "spegel", "--config", str(config)],
        log_path,
        cwd=workdir,
        env=environment,
    )
    return process, log_path
