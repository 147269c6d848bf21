"""A rollout: N nodes pull the same new image from one slow upstream at nearly the same time.

    python3 bench/rollout.py [--nodes 5] [--rounds 1]

Needs root, Debian's containerd, docker-registry and skopeo. Starts N real nodes
(tests/support/cluster.py: a private containerd and ``twistd -n spegel`` each,
on loopback addresses of their own) and an upstream docker-registry holding a
105 MiB four-layer image. The nodes reach the upstream through one
``Throttle`` (tests/support/throttle.py), a userspace shaper that sends
100 Mbit/s in total to all of them together, as one uplink would, and counts
every byte it sends. Each case starts with no node holding the image; the
nodes' pulls (``ctr images pull``, what CRI does) start 0.3 s apart, or all at
once. The cases:

  direct      no spegel-tx: every node pulls from the upstream itself;
  off         spegel-tx advertising an image once it is complete (Spegel);
  committed   spegel-tx advertising each blob once containerd committed it;
  in-flight   spegel-tx also serving blobs still downloading (the default).

The reference is measured in the same run: one node pulling alone, straight
from the throttled upstream. For each case it prints the bytes the upstream
sent (and that over the image's size), the nodes' pull times (median, max) and
the slowest over the lone pull; for in-flight 0.3 s apart the goals are at
most 1.2x the image's bytes and 1.3x the lone pull. Every process is stopped
by PID however the run ends, SIGTERM included.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.cluster import MirrorCluster, SpegelNode, running_cluster  # noqa: E402

UPLINK = 100e6 / 8
"""100 Mbit/s, in bytes a second."""

PULL_TIMEOUT = 600.0
MODES = ("off", "committed", "in-flight")


@dataclass(frozen=True)
class Outcome:
    upstream_bytes: int
    seconds: list[float]


def pull_commands(node: SpegelNode, name: str, mirrored: bool) -> list[str]:
    if mirrored:
        return node.pull_command(name)
    return node.ctr_command("images", "pull", "--plain-http", name)


def rollout(cluster: MirrorCluster, nodes: list[SpegelNode], gap: float, mirrored: bool) -> Outcome:
    """Every node in ``nodes`` pulls the big image, each ``gap`` seconds after the last."""
    big, throttle = cluster.big, cluster.throttle
    assert throttle is not None
    for node in cluster.nodes.values():
        node.remove_image(big.name, big.digests)
    sent_before = throttle.sent()
    pulls: list[tuple[subprocess.Popen[bytes], float]] = []
    for index, node in enumerate(nodes):
        if index:
            time.sleep(gap)
        command = pull_commands(node, big.name, mirrored)
        started = time.monotonic()
        pulls.append(
            (subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), started)
        )
    seconds = []
    for (pull, started), node in zip(pulls, nodes, strict=True):
        _, error = pull.communicate(timeout=PULL_TIMEOUT)
        ended = time.monotonic()
        if pull.returncode != 0:
            raise RuntimeError(f"{node} could not pull: {error.decode(errors='replace')}")
        seconds.append(ended - started)
    time.sleep(0.2)  # the throttle writes its count every 50 ms
    for node in nodes:
        if node.image_digest(big.name) != big.index_digest:
            raise RuntimeError(f"{node} does not hold the image")
    return Outcome(throttle.sent() - sent_before, seconds)


def set_mode(cluster: MirrorCluster, mode: str) -> None:
    """Restart every node with ``first-wave-sharing: mode``, as a config change would."""
    for node in cluster.nodes.values():
        node.stop()
        node.keys["first-wave-sharing"] = mode
        node.start()
    for node in cluster.nodes.values():
        node.wait_ready()
    deadline = time.monotonic() + 30
    while not all(len(n.peers()) == len(cluster.nodes) - 1 for n in cluster.nodes.values()):
        if time.monotonic() > deadline:
            raise RuntimeError("the nodes did not find each other again")
        time.sleep(0.2)


def line(label: str, outcome: Outcome, image_bytes: int, alone: float) -> str:
    times = outcome.seconds
    return (
        f"  {label:<24} upstream {outcome.upstream_bytes / 2**20:7.1f} MiB "
        f"({outcome.upstream_bytes / image_bytes:4.2f}x image)   "
        f"pull median {statistics.median(times):6.2f} s  max {max(times):6.2f} s "
        f"({max(times) / alone:4.2f}x alone)"
    )


def measure(cluster: MirrorCluster, rounds: int) -> None:
    big = cluster.big
    nodes = list(cluster.nodes.values())
    image_bytes = sum(big.size(d) for d in big.digests)
    print(
        f"{len(nodes)} nodes; image {image_bytes / 2**20:.0f} MiB in {len(big.layer_digests)} "
        f"layers; upstream limited to {UPLINK * 8 / 1e6:.0f} Mbit/s in total"
    )
    alone = statistics.median(
        max(rollout(cluster, nodes[:1], 0, mirrored=False).seconds) for _ in range(rounds)
    )
    print(f"reference: one node alone, straight from the upstream: {alone:.2f} s")
    for gap, schedule in ((0.3, "0.3 s apart"), (0.0, "all at once")):
        print(f"{schedule}:")
        print(
            line("direct (no spegel-tx)", rollout(cluster, nodes, gap, False), image_bytes, alone)
        )
        for mode in MODES:
            set_mode(cluster, mode)
            outcomes = [rollout(cluster, nodes, gap, True) for _ in range(rounds)]
            worst = max(outcomes, key=lambda o: max(o.seconds))
            print(line(f"spegel-tx {mode}", worst, image_bytes, alone))
    print("goals, in-flight 0.3 s apart: upstream <= 1.20x image, slowest <= 1.30x alone")


def exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    """Turn SIGTERM into SystemExit, so the cluster is stopped on the way out."""
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5, help="nodes pulling (5 to 12)")
    parser.add_argument("--rounds", type=int, default=1, help="rollouts per case (worst shown)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    names = tuple(chr(ord("A") + i) for i in range(max(5, min(args.nodes, 12))))
    with (
        tempfile.TemporaryDirectory(prefix="spegel-bench-rollout-") as base,
        running_cluster(Path(base), node_names=names, upstream_rate=UPLINK) as cluster,
    ):
        measure(cluster, max(1, min(args.rounds, 5)))


if __name__ == "__main__":
    main()
