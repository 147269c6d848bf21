"""See spegel-tx serve containerd's content, on one machine, in about a minute.

Starts a private containerd under a temporary directory (the machine's own
containerd, if any, is not touched), imports a generated three-layer image,
runs ``twistd -n spegel`` against it, pulls the image back through it with
skopeo and with ctr, prints the request log, and stops everything. The node's
registry, router and metrics listen on a loopback address of the demo's own, on
free ports, so the demo runs beside anything on :5000, :5001 or :9090. Run as
root: ``bash deploy/examples/demo.sh``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from deploy.examples.story import run_story, step  # noqa: E402
from tests.support.containerd import Containerd  # noqa: E402
from tests.support.loopback import loopback_host  # noqa: E402
from tests.support.ociimage import build_image  # noqa: E402
from tests.support.processes import start_spegel, stop_process, wait_for_http  # noqa: E402


def main(work: Path) -> None:
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

        keys = containerd.node_keys(loopback_host())
        address = keys["registry-addr"]
        step(f"running: twistd -n spegel --config node.yaml  (registry on {address})")
        print(f"node.yaml: registry-addr {address}, router-addr {keys['router-addr']}, ", end="")
        print(f"metrics-addr {keys['metrics-addr']}")
        node, log_path = start_spegel(keys, work / "node")
        wait_for_http(f"http://{address}/readyz", node, log_path, timeout=30)
        print("ready: GET /readyz answered 200")

        url = f"http://{address}/v2/library/demo/manifests/v1?ns=registry.example"
        step(f"what containerd asks first: HEAD {url}")
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as response:
            for header in ("Content-Type", "Docker-Content-Digest", "Content-Length"):
                print(f"{header}: {response.headers[header]}")

        # A client that talks to the node directly has no ns to send: it asks by digest.
        step("skopeo copies the image out of spegel-tx, by digest")
        started = time.monotonic()
        copied = subprocess.run(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--src-tls-verify=false",
                f"docker://{address}/library/demo@{image.manifest_digest}",
                f"oci:{work / 'copy'}:v1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if copied.returncode != 0:
            raise RuntimeError(f"skopeo copy failed: {copied.stderr.strip()}")
        print(f"copied in {time.monotonic() - started:.2f}s")

        step("ctr pulls it through spegel-tx into another namespace")
        reference = f"{address}/library/demo@{image.index_digest}"
        containerd.ctr("images", "pull", "--plain-http", reference, namespace="demo-pull")
        print(containerd.ctr("images", "ls", "-q", namespace="demo-pull"))

        step("the request log (one JSON line per request; method status bytes time handler)")
        for line in log_path.read_text().splitlines():
            record = json.loads(line)
            if record.get("namespace") == "spegel_tx.access":
                print(record["msg"])
    finally:
        if node is not None:
            stop_process(node)
        containerd.stop()
    print("\nspegel-tx served the node's containerd content. Everything is stopped now.")


if __name__ == "__main__":
    run_story(main, "spegel-demo-")
