"""See three spegel-tx nodes pull from each other, on one machine, in about a minute.

Starts an upstream docker-registry holding a generated 105 MiB image, and three
nodes A, B and C, each a private containerd (its own root, socket and certs.d
written by ``spegel-tx configuration``) with ``twistd -n spegel`` beside it.
Every process listens on a loopback address of its own, on free ports, so the
demo runs beside anything on :5000, :5001 or :9090. A pulls from the upstream,
the upstream stops, B and C pull anyway, and every process is stopped at the
end. Each step waits for what it needs (readiness, the advertisements it relies
on) as read from the nodes' debug endpoints. The machine's own containerd, if
any, is not touched. Run as root: ``bash deploy/examples/demo.sh mirror``.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from deploy.examples.story import run_story, step  # noqa: E402
from tests.support.cluster import (  # noqa: E402
    MirrorCluster,
    SpegelNode,
    keys_of,
    running_cluster,
    wait_until_listed,
)
from tests.support.processes import poll  # noqa: E402


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


def show_pull(node: SpegelNode, reference: str) -> None:
    since = node.log_offset()
    seconds = node.pull(reference)
    print(f"{node.name} pulled {reference} in {seconds:.2f} s")
    print(f"{node.name}'s spegel-tx: {served_by(node, since)}")


def show_found(asker: SpegelNode, holders: list[SpegelNode], cluster: MirrorCluster) -> None:
    """Wait until ``asker``'s DHT lists every holder for the image's tag and every blob."""
    big = cluster.big
    started = time.monotonic()
    found = wait_until_listed(asker, keys_of(big), holders)
    names = ", ".join(h.name for h in holders)
    print(
        f"{asker.name}'s /debug/lookup finds {names} for the tag and all {len(big.digests)} "
        f"digests (waited {time.monotonic() - started:.1f} s): {sorted(found[big.name])}"
    )


def run(cluster: MirrorCluster) -> None:
    big = cluster.big
    for node in cluster.nodes.values():
        print(f"node {node.name}: registry {node.url}, DHT {node.router_address} (UDP)")
    print(f"upstream: {cluster.upstream_url}; image {big.name}, 105 MiB in 4 layers")
    print("every node answers /readyz and lists the other two in /debug/peers")
    hosts = cluster.b.certs_dir / cluster.upstream.address / "hosts.toml"
    print(f"\nB's {hosts.relative_to(cluster.base)}, written by `spegel-tx configuration`:")
    print(hosts.read_text())

    step("A pulls the image; containerd asks A's spegel-tx first, which answers 404, then upstream")
    show_pull(cluster.a, big.name)
    show_found(cluster.b, [cluster.a], cluster)

    step("the upstream registry stops; B pulls the same image anyway")
    cluster.upstream.stop()
    show_pull(cluster.b, big.name)
    show_found(cluster.c, [cluster.a, cluster.b], cluster)

    step("an image nobody holds: B's spegel-tx answers 404 at once, so containerd goes upstream")
    url = cluster.manifest_url(cluster.b, cluster.other, cluster.other.tag)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    print(f"HEAD {url} -> {status} in {(time.perf_counter() - started) * 1000:.1f} ms")

    step("A's spegel-tx is killed (no goodbye, its DHT records stay); C pulls the image")
    cluster.a.kill()
    show_pull(cluster.c, big.name)

    step("the image is deleted on B and C: their spegel-tx withdraw it")
    for node in (cluster.b, cluster.c):
        node.remove_image(big.name, big.digests)
    layer = big.layer_digests[0]
    withdrawn = {cluster.b.address, cluster.c.address}
    if not poll(lambda: not withdrawn & set(cluster.c.lookup(layer)), 10):
        raise RuntimeError(f"B and C still advertise {layer}: {cluster.c.lookup(layer)}")
    print(f"C's lookup of the largest layer now finds {cluster.c.lookup(layer)}")
    print("(A's records, never withdrawn since it was killed, expire after router-record-ttl)")


def main(work: Path) -> None:
    step(f"starting an upstream registry and three nodes under {work}")
    with running_cluster(work) as cluster:
        run(cluster)
    step("stopped every process")


if __name__ == "__main__":
    run_story(main, "spegel-mirror-demo-")
