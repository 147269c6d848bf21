"""See three spegel-tx nodes pull from each other, on one machine, in under a minute.

Starts an upstream docker-registry on 127.0.0.30 holding a generated 105 MiB
image, and three nodes A, B and C on 127.0.0.31-33, each a private containerd
(its own root, socket and certs.d written by ``spegel-tx configuration``) with
``twistd -n spegel`` beside it. Then A pulls from the upstream, the upstream
stops, B and C pull anyway, and every process is stopped at the end. The
machine's own containerd, if any, is not touched. Run from a checkout, as
root: ``bash deploy/examples/demo.sh mirror``.
"""

from __future__ import annotations

import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.cluster import MirrorCluster, SpegelNode, running_cluster  # noqa: E402
from tests.support.processes import poll  # noqa: E402


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def served_by(node: SpegelNode, since: int) -> str:
    """What the node's access log says about the requests since ``since``."""
    lines = node.access_log(since)
    sources = Counter(
        f"{line['handler']} {line['peer']}" if line["handler"] == "mirror" else line["handler"]
        for line in lines
    )
    moved = sum(line["bytes"] for line in lines if line["status"] in (200, 206))
    summary = ", ".join(f"{count} x {source}" for source, count in sources.items())
    return f"{len(lines)} requests ({summary}), {moved / (1 << 20):.1f} MiB sent to containerd"


def show_pull(cluster: MirrorCluster, node: SpegelNode, reference: str) -> None:
    since = node.log_offset()
    seconds = node.pull(reference)
    print(f"{node.name} pulled {reference} in {seconds:.2f} s")
    print(f"{node.name}'s spegel-tx: {served_by(node, since)}")


def run(cluster: MirrorCluster) -> None:
    big = cluster.big
    for node in cluster.nodes.values():
        print(f"node {node.name}: registry {node.url}, DHT {node.router_address} (UDP)")
    print(f"upstream: {cluster.upstream_url}; image {big.name}, 105 MiB in 4 layers")
    hosts = cluster.b.certs_dir / cluster.upstream.address / "hosts.toml"
    print(f"\nB's {hosts.relative_to(cluster.base)}, written by `spegel-tx configuration`:")
    print(hosts.read_text())

    step("A pulls the image; containerd asks A's spegel-tx first, which answers 404, then upstream")
    show_pull(cluster, cluster.a, big.name)
    found = poll(lambda: cluster.b.lookup(big.name), 10)
    print(f"B's /debug/lookup?key={big.name}: {found}")

    step("the upstream registry stops; B pulls the same image anyway")
    cluster.upstream.stop()
    show_pull(cluster, cluster.b, big.name)

    step("an image nobody holds: B's spegel-tx answers 404 at once, so containerd goes upstream")
    url = cluster.manifest_url(cluster.b, cluster.other, cluster.other.tag)
    started = time.perf_counter()
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5)
    except urllib.error.HTTPError as e:
        print(f"HEAD {url} -> {e.code} in {(time.perf_counter() - started) * 1000:.1f} ms")

    step("A's spegel-tx is killed (no goodbye, its DHT records stay); C pulls the image")
    cluster.a.kill()
    show_pull(cluster, cluster.c, big.name)

    step("the image is deleted on B and C: their spegel-tx withdraw it")
    for node in (cluster.b, cluster.c):
        node.remove_image(big.name, big.digests)
    left = poll(lambda: not cluster.c.lookup(big.layer_digests[0]), 10)
    print(f"C's lookup of the largest layer now finds {cluster.c.lookup(big.layer_digests[0])}")
    if not left:
        print("(A's records, never withdrawn since it was killed, expire after router-record-ttl)")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="spegel-mirror-demo-") as base:
        step(f"starting an upstream registry and three nodes under {base}")
        with running_cluster(Path(base)) as cluster:
            run(cluster)
        step("stopped every process")


if __name__ == "__main__":
    main()
