"""An upstream registry for tests: Debian's ``docker-registry`` on loopback, filled by skopeo."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.loopback import loopback_host
from tests.support.ociimage import SyntheticImage
from tests.support.processes import free_port, start_process, stop_process, wait_for_http

CONFIG = """\
version: 0.1
log:
  level: {log_level}
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: {address}
"""


_ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) ')


@dataclass(frozen=True)
class RegistryRequest:
    method: str
    uri: str
    status: int


class DockerRegistry:
    """One ``docker-registry serve`` process with filesystem storage under ``base``.

    No auth and plain HTTP, like a registry on a private network; ``address``
    is ``host:port`` as it appears in image references.
    """

    def __init__(self, base: Path, host: str | None = None, log_level: str = "warn") -> None:
        """On ``host``, or on an address of this run's own (``loopback_host``)."""
        base.mkdir(parents=True, exist_ok=True)
        self.host = host or loopback_host()
        self.port = free_port(self.host)
        self.address = f"{self.host}:{self.port}"
        self.url = f"http://{self.address}"
        self.log_path = base / "registry.log"
        self.config = base / "config.yml"
        self.config.write_text(
            CONFIG.format(storage=base / "storage", address=self.address, log_level=log_level)
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, timeout: float = 20.0) -> None:
        self.process = start_process(["docker-registry", "serve", str(self.config)], self.log_path)
        wait_for_http(f"{self.url}/v2/", self.process, self.log_path, timeout)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None

    def log_offset(self) -> int:
        """Where the log ends now; pass it as ``since`` to ``requests``."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def requests(self, since: int = 0) -> list[RegistryRequest]:
        """Every request the registry answered after ``since``, from its access log.

        docker-registry writes one combined-format line per request whatever
        its log level (``"GET /v2/... HTTP/1.1" 200 1234``).
        """
        try:
            with self.log_path.open("rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return [
            RegistryRequest(m["method"], m["uri"], int(m["status"]))
            for m in _ACCESS_LINE.finditer(text)
        ]

    def push(
        self, image: SyntheticImage, repository: str | None = None, tag: str | None = None
    ) -> str:
        """Copy ``image`` here with its digests unchanged; returns the pushed reference."""
        reference = f"{self.address}/{repository or image.repository}:{tag or image.tag}"
        push_layout(image, f"docker://{reference}")
        return reference


def push_layout(image: SyntheticImage, destination: str) -> None:
    """``skopeo copy`` the image's OCI layout to ``destination`` (any skopeo transport)."""
    skopeo_copy(f"oci:{image.layout_dir}:{image.tag}", destination, "--all")


def skopeo_copy(source: str, destination: str, *flags: str) -> None:
    """``skopeo copy source destination``, with digests kept.

    ``--preserve-digests`` makes skopeo fail rather than re-compress or rewrite
    a manifest, so what lands is byte for byte what ``source`` holds.
    ``--insecure-policy`` keeps the copy independent of /etc/containers/policy.json.
    """
    result = subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            "--preserve-digests",
            *flags,
            source,
            destination,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"skopeo copy to {destination} failed: {result.stderr}")
