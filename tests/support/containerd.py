"""A private containerd: its own root, state, sockets and certs.d under one directory."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tests.support.processes import (
    free_ports,
    kill_process,
    log_tail,
    start_process,
    stop_process,
)

CONFIG = """\
version = 2
root = "{base}/root"
state = "{base}/state"
[grpc]
  address = "{base}/containerd.sock"
[ttrpc]
  address = "{base}/containerd-ttrpc.sock"
[debug]
  address = "{base}/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
{cri}"""
CRI_REGISTRY = """\
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{base}/certs.d"
"""


class Containerd:
    """One containerd process; ``start`` again after ``stop`` or ``kill`` on the same root.

    Content sharing between namespaces is ``isolated``, so a pull into another
    namespace really downloads every blob instead of borrowing it.
    """

    namespace = "k8s.io"

    def __init__(self, base: Path, cri: str = CRI_REGISTRY, wrapper: Sequence[str] = ()) -> None:
        """``cri`` is the config's CRI plugin tables (``{base}`` is replaced); the default
        points its registry config_path at ``certs_dir``. ``wrapper`` runs it inside
        something, as ``ip netns exec NAME``."""
        self.base = base
        self.wrapper = list(wrapper)
        base.mkdir(parents=True, exist_ok=True)
        self.address = str(base / "containerd.sock")
        self.root = base / "root"
        self.content_path = str(self.root / "io.containerd.content.v1.content")
        self.certs_dir = base / "certs.d"
        self.certs_dir.mkdir(exist_ok=True)
        self.log_path = base / "containerd.log"
        self.config = base / "config.toml"
        self.config.write_text(CONFIG.format(base=base, cri=cri.format(base=base)))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def node_keys(self, host: str) -> dict[str, object]:
        """A spegel-tx node.yaml for a node beside this containerd, on free ports at ``host``."""
        port, router_port, metrics_port = free_ports(host, 3)
        return {
            "registry-addr": f"{host}:{port}",
            "router-addr": f"{host}:{router_port}",
            "metrics-addr": f"{host}:{metrics_port}",
            "containerd-sock": self.address,
            "containerd-namespace": self.namespace,
            "containerd-content-path": self.content_path,
        }

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until ``ctr version`` answers; a containerd that never does is stopped."""
        self.process = start_process(
            [*self.wrapper, "containerd", "--config", str(self.config)], self.log_path
        )
        try:
            self._wait_answering(self.process, timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_answering(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"containerd exited:\n{log_tail(self.log_path)}")
            answer = subprocess.run(
                ["ctr", "--address", self.address, "version"], capture_output=True, timeout=10
            )
            if answer.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"containerd did not answer in {timeout}s:\n{log_tail(self.log_path)}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            kill_process(self.process)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def ctr(self, *args: str, namespace: str | None = None, stdin: IO[bytes] | None = None) -> str:
        answer = subprocess.run(
            ["ctr", "--address", self.address, "-n", namespace or self.namespace, *args],
            capture_output=True,
            stdin=stdin,
            timeout=300,
        )
        if answer.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed: {answer.stderr.decode()}")
        return answer.stdout.decode()


@contextmanager
def running_containerd(base: Path, archive: Path, name: str | None = None) -> Iterator[Containerd]:
    """A started containerd holding the image ``archive`` in ``k8s.io``; stopped on exit.

    With ``name``, the import must have listed the image under that name.
    """
    instance = Containerd(base)
    try:
        instance.start()
        instance.ctr("images", "import", str(archive))
        names = instance.ctr("images", "ls", "-q").split()
        if name is not None and name not in names:
            raise RuntimeError(f"import did not name the image {name}: {names}")
        yield instance
    finally:
        instance.stop()
