"""See spegel-tx serve containerd's content, on one machine, in about a minute.

Starts a private containerd under a temporary directory (the machine's own
containerd, if any, is not touched), imports a generated three-layer image,
runs ``twistd -n spegel`` against it on 127.0.0.1, pulls the image back
through it with skopeo and with ctr, prints the request log, and stops
everything. Run from a checkout, as root: ``bash deploy/examples/demo.sh``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.containerd import Containerd  # noqa: E402
from tests.support.ociimage import build_image  # noqa: E402
from tests.support.processes import (  # noqa: E402
    free_port,
    start_spegel,
    stop_process,
    wait_for_http,
)


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="spegel-demo-"))
    containerd = Containerd(work / "containerd")
    node = None
    try:
        step(f"starting a private containerd in {containerd.base}")
        containerd.start()
        print(containerd.ctr("version").splitlines()[1].strip())

        step("building a 3-layer image (6 MiB) and importing it into namespace k8s.io")
        image = build_image(work / "image", name="registry.example/library/demo:v1")
        containerd.ctr("images", "import", str(image.archive))
        print(containerd.ctr("images", "ls", "-q"))

        port = free_port("127.0.0.1")
        step(f"running: twistd -n spegel --config node.yaml  (registry on 127.0.0.1:{port})")
        keys = {
            "registry-addr": f"127.0.0.1:{port}",
            "containerd-sock": containerd.address,
            "containerd-content-path": containerd.content_path,
        }
        node, log_path = start_spegel(keys, work)
        wait_for_http(f"http://127.0.0.1:{port}/readyz", node, log_path, timeout=30)
        print("ready: GET /readyz answered 200")

        url = f"http://127.0.0.1:{port}/v2/library/demo/manifests/v1?ns=registry.example"
        step(f"what containerd asks first: HEAD {url}")
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as response:
            for header in ("Content-Type", "Docker-Content-Digest", "Content-Length"):
                print(f"{header}: {response.headers[header]}")

        step("skopeo copies the image out of spegel-tx")
        started = time.monotonic()
        subprocess.run(
            [
                "skopeo",
                "copy",
                "--src-tls-verify=false",
                f"docker://127.0.0.1:{port}/library/demo:v1",
                f"oci:{work / 'copy'}:v1",
            ],
            check=True,
        )
        print(f"copied in {time.monotonic() - started:.2f}s")

        step("ctr pulls it through spegel-tx into another namespace")
        containerd.ctr(
            "images",
            "pull",
            "--plain-http",
            f"127.0.0.1:{port}/library/demo:v1",
            namespace="demo-pull",
        )
        print(containerd.ctr("images", "ls", "-q", namespace="demo-pull"))

        step("the request log (one JSON line per request; method status bytes time handler)")
        for line in log_path.read_text().splitlines():
            record = json.loads(line)
            if record.get("namespace") == "spegel_tx.access":
                print(record["msg"])
        print("\nspegel-tx served the node's containerd content. Everything is stopped now.")
    finally:
        if node is not None:
            stop_process(node)
        containerd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
