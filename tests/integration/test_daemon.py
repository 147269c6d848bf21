"""The twistd daemon as an operator sees it: readiness follows containerd, no crash, no restart."""

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import require
from tests.support.containerd import Containerd

pytestmark = pytest.mark.integration


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def wait_for_status(url: str, expected: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while status(url) != expected:
        assert time.monotonic() < deadline, f"{url} never answered {expected}"
        time.sleep(0.1)


def test_node_waits_for_containerd_and_follows_it(spegel_node, tmp_path, demo_image):
    require("containerd", "ctr")
    containerd = Containerd(tmp_path / "late-containerd")
    node = spegel_node(containerd, wait_ready=False)
    try:
        assert status(f"{node.url}/readyz") == 503
        assert status(f"{node.url}/livez") == 200
        blob = f"{node.url}/v2/library/demo/blobs/{demo_image.layer_digests[0]}"
        assert status(blob) == 404, "no containerd: a fast 404 so containerd goes upstream"

        containerd.start()
        containerd.ctr("images", "import", str(demo_image.archive))
        wait_for_status(f"{node.url}/readyz", 200)
        assert status(blob) == 200

        containerd.kill()
        wait_for_status(f"{node.url}/readyz", 503)
        assert node.process.poll() is None, "the daemon must outlive containerd"
        containerd.start()
        wait_for_status(f"{node.url}/readyz", 200)
        assert status(blob) == 200
    finally:
        containerd.stop()
    messages = [json.loads(line)["msg"] for line in node.log_path.read_text().splitlines()]
    assert any("containerd" in m and "not reachable" in m for m in messages), messages[:20]
