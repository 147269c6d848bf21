"""skopeo, ctr and plain HTTP pulling from a running `twistd -n spegel` over a real containerd."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import require
from tests.support.ociimage import OCI_INDEX

pytestmark = pytest.mark.integration


@pytest.fixture
def node(spegel_node, containerd):
    return spegel_node(containerd)


def skopeo_copy(source: str, destination: Path) -> None:
    require("skopeo")
    result = subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", source, f"oci:{destination}:copy"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def copied_blobs(layout: Path) -> dict[str, bytes]:
    return {
        "sha256:" + path.name: path.read_bytes() for path in (layout / "blobs" / "sha256").iterdir()
    }


def access_log(node) -> list[dict]:
    return [
        record
        for record in map(json.loads, node.log_path.read_text().splitlines())
        if record.get("namespace") == "spegel_tx.access"
    ]


def test_skopeo_copies_the_image_byte_for_byte(node, demo_image, tmp_path):
    source = f"docker://{node.address}/{demo_image.repository}@{demo_image.manifest_digest}"
    skopeo_copy(source, tmp_path / "copy")
    blobs = copied_blobs(tmp_path / "copy")
    for digest in [demo_image.manifest_digest, demo_image.config_digest, *demo_image.layer_digests]:
        assert digest in blobs, digest
        assert hashlib.sha256(blobs[digest]).hexdigest() == digest.split(":")[1]
        assert blobs[digest] == demo_image.read_blob(digest)
    served = {(r["path"].split("?")[0], r["status"], r["handler"]) for r in access_log(node)}
    for digest in demo_image.layer_digests:
        assert (f"/v2/{demo_image.repository}/blobs/{digest}", 200, "local") in served


def test_a_direct_client_asking_for_a_tag_is_told_to_ask_by_digest(node, demo_image, tmp_path):
    """Without ns a tag names no one image (as in Spegel); skopeo says why."""
    require("skopeo")
    source = f"docker://{node.address}/{demo_image.repository}:{demo_image.tag}"
    copied = subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", source, f"oci:{tmp_path / 'copy'}:copy"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert copied.returncode != 0
    assert "without ns=<registry>: ask by digest" in copied.stderr


def test_ctr_pulls_into_another_namespace(node, containerd, demo_image):
    reference = f"{node.address}/{demo_image.repository}@{demo_image.index_digest}"
    containerd.ctr("images", "pull", "--plain-http", reference, namespace="pulltest")
    try:
        listing = containerd.ctr("images", "ls", namespace="pulltest")
        [line] = [line for line in listing.splitlines() if line.startswith(reference)]
        assert demo_image.index_digest in line.split()
        layer_bytes = sum(
            r["bytes"]
            for r in access_log(node)
            if any(d in r["path"] for d in demo_image.layer_digests) and r["status"] == 200
        )
        expected = sum(demo_image.size(d) for d in demo_image.layer_digests)
        assert layer_bytes == expected, "containerd must really download every layer from us"
    finally:
        containerd.ctr("images", "rm", reference, namespace="pulltest")


def request(method: str, url: str, headers: dict[str, str] | None = None):
    try:
        return urllib.request.urlopen(
            urllib.request.Request(url, method=method, headers=headers or {})
        )
    except urllib.error.HTTPError as error:
        return error


def test_head_with_ns_answers_as_containerd_expects(node, demo_image):
    registry = demo_image.name.split("/", 1)[0]
    url = f"{node.url}/v2/{demo_image.repository}/manifests/{demo_image.tag}?ns={registry}"
    with request("HEAD", url) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == demo_image.index_digest
        assert response.headers["Content-Type"] == OCI_INDEX
        assert int(response.headers["Content-Length"]) == demo_image.size(demo_image.index_digest)
        assert response.read() == b""


def test_resumed_layer_download_gets_the_rest(node, demo_image):
    digest = demo_image.layer_digests[-1]
    data = demo_image.read_blob(digest)
    url = f"{node.url}/v2/{demo_image.repository}/blobs/{digest}"
    with request("GET", url, {"Range": "bytes=1048576-"}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1048576-{len(data) - 1}/{len(data)}"
        assert response.read() == data[1048576:]


def test_unknown_content_is_a_fast_oci_404(node, demo_image):
    """A node with no peers has nobody to ask: the 404 comes at once. The bound is
    generous for a busy machine; the figure measured is in the failure."""
    url = f"{node.url}/v2/{demo_image.repository}/manifests/nope?ns=docker.io"
    request("GET", url).close()  # a first connection and request warm the node
    started = time.monotonic()
    with request("GET", url) as response:
        assert response.status == 404
        assert json.loads(response.read())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    seconds = time.monotonic() - started
    assert seconds < 1.0, f"the 404 took {seconds:.3f} s"
