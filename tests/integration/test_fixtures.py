"""The shared real-process fixtures do what the other integration tests take for granted."""

from __future__ import annotations

import hashlib
import socket
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.containerd import Containerd, running_containerd
from tests.support.loopback import loopback_host
from tests.support.ociimage import OCI_INDEX, OCI_MANIFEST, SyntheticImage
from tests.support.processes import (
    free_port,
    start_process,
    stop_process,
    wait_for_http,
)
from tests.support.registry import DockerRegistry

pytestmark = pytest.mark.integration


def test_containerd_answers_ctr_version(containerd: Containerd) -> None:
    answer = containerd.ctr("version")
    assert "Server:" in answer
    assert containerd.namespace == "k8s.io"
    assert Path(containerd.address).is_socket()
    assert containerd.certs_dir.is_dir()


def test_demo_image_is_imported_under_its_name(
    containerd: Containerd, demo_image: SyntheticImage
) -> None:
    [line] = [
        line
        for line in containerd.ctr("images", "ls").splitlines()
        if line.split()[0] == demo_image.name
    ]
    assert line.split()[2] == demo_image.index_digest
    blobs = Path(containerd.content_path) / "blobs" / "sha256"
    for digest in demo_image.digests:
        stored = blobs / digest.split(":", 1)[1]
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest.split(":", 1)[1]


def test_containerd_restarts_on_the_same_root(
    containerd: Containerd, tmp_path: Path, demo_image: SyntheticImage
) -> None:
    """On a containerd of its own: restarting the session's one would disturb other tests."""
    with running_containerd(tmp_path / "own", demo_image.archive, demo_image.name) as own:
        old_pid = own.pid
        own.restart()
        assert own.pid not in (None, old_pid)
        assert demo_image.name in own.ctr("images", "ls", "-q").split()
    assert own.pid is None


def get(url: str, accept: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def test_docker_registry_serves_the_pushed_image(
    docker_registry: DockerRegistry, demo_image: SyntheticImage
) -> None:
    reference = docker_registry.push(demo_image)
    assert reference == f"{docker_registry.address}/library/demo:v1"
    base = f"{docker_registry.url}/v2/{demo_image.repository}"

    status, headers, body = get(f"{base}/manifests/{demo_image.tag}", OCI_INDEX)
    assert status == 200
    assert headers["Docker-Content-Digest"] == demo_image.index_digest
    assert headers["Content-Type"] == OCI_INDEX
    assert body == demo_image.read_blob(demo_image.index_digest)

    status, headers, body = get(f"{base}/manifests/{demo_image.manifest_digest}", OCI_MANIFEST)
    assert headers["Docker-Content-Digest"] == demo_image.manifest_digest
    assert body == demo_image.read_blob(demo_image.manifest_digest)
    for digest in [demo_image.config_digest, *demo_image.layer_digests]:
        status, headers, body = get(f"{base}/blobs/{digest}", "*/*")
        assert status == 200
        assert body == demo_image.read_blob(digest)


def test_processes_are_waited_for_and_stopped_by_pid(tmp_path: Path) -> None:
    host = loopback_host()
    port = free_port(host)
    server = (
        "import http.server, sys\n"
        "http.server.HTTPServer((sys.argv[1], int(sys.argv[2])),"
        " http.server.SimpleHTTPRequestHandler).serve_forever()\n"
    )
    log = tmp_path / "server.log"
    process = start_process([sys.executable, "-c", server, host, str(port)], log, cwd=tmp_path)
    try:
        wait_for_http(f"http://{host}:{port}/", process, log, timeout=10)
    finally:
        stop_process(process, grace=5)
    assert process.returncode is not None
    with socket.socket() as probe:
        assert probe.connect_ex((host, port)) != 0


def test_a_dead_process_fails_the_wait_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "dead.log"
    process = start_process([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], log)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            host = loopback_host()
            wait_for_http(f"http://{host}:{free_port(host)}/", process, log, timeout=10)
    finally:
        stop_process(process)
