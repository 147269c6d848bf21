"""How much faster node B pulls an image through spegel-tx than from a slow upstream.

    python3 bench/pull.py [--rounds 3]

Needs root (tc), Debian's containerd, docker-registry, skopeo and curl. Starts
the test suite's three-node cluster (tests/support/cluster.py: an upstream
docker-registry holding a 105 MiB four-layer image and nodes A, B, C, each on
a loopback address of its own), lets A pull the image, then times node B's containerd
getting it, B's copy removed between rounds, in two ways: ``ctr images pull``
(what CRI does: fetch, then unpack) and ``ctr content fetch`` (fetch only, so
containerd's unpack does not hide what the transfer costs; timed to the moment
containerd committed the last blob, since ctr only returns on its progress
display's next 100 ms tick). Each way in three cases:

  (a) straight from the upstream, limited to 100 Mbit/s by an htb class on the
      loopback that shapes only what the upstream's address sends;
  (b) through B's spegel-tx, which forwards to A, with the upstream still limited;
  (c) straight from the upstream, unlimited: containerd's own ingest speed.

(b) and (c) take turns, round by round, so that a busy spell on the machine
slows both rather than skewing their ratio. For each way it prints the times
(median of ``--rounds``), the improvement of (b) over (a) (Spegel publishes
81%), and (b)/(c), what spegel-tx adds to containerd's own time. Then the blob
path alone: the 64 MiB layer fetched with curl from A (local, sendfile) and
from B (forwarded from A), and B's peak RSS.
The shaping is removed and every process stopped (by PID) however the run ends,
SIGTERM included.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.cluster import MirrorCluster, running_cluster  # noqa: E402

LIMIT = "100mbit"
LIMITED_CLASS = "1:20"


@dataclass(frozen=True)
class Way:
    """A ctr command that gets the image into B's containerd."""

    name: str
    command: tuple[str, ...]
    unpacks: bool
    """Whether it ends with an image record (and its unpacked layers), not content alone.
    A way that does not is timed to containerd's commit of the last blob (its file's
    mtime); one that does, to ctr's exit."""


PULL = Way("ctr images pull", ("images", "pull"), unpacks=True)
FETCH = Way("ctr content fetch", ("content", "fetch"), unpacks=False)


def tc(*args: str) -> None:
    subprocess.run(["tc", *args], check=True, capture_output=True, text=True)


@contextmanager
def upstream_limited(cluster: MirrorCluster) -> Iterator[None]:
    """Shape what the upstream sends to LIMIT with htb on the loopback.

    Only packets from the upstream's address are classified; htb sends
    unclassified packets (``default 0``) straight through, unshaped.
    """
    tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb")
    try:
        tc(
            "class", "add", "dev", "lo", "parent", "1:", "classid", LIMITED_CLASS,
            "htb", "rate", LIMIT, "ceil", LIMIT,
        )  # fmt: skip
        tc(
            "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
            "u32", "match", "ip", "src", f"{cluster.upstream.host}/32", "flowid", LIMITED_CLASS,
        )  # fmt: skip
        yield
    finally:
        tc("qdisc", "del", "dev", "lo", "root")


def pull_direct(cluster: MirrorCluster, way: Way) -> None:
    """B's containerd pulls from the upstream itself: no hosts dir, no mirror."""
    run_ctr(cluster.b.ctr_command(*way.command, "--plain-http", cluster.big.name))


def pull_through_spegel(cluster: MirrorCluster, way: Way) -> None:
    """B's containerd asks its spegel-tx first, through the hosts.toml CRI would use."""
    b = cluster.b
    run_ctr(b.ctr_command(*way.command, "--hosts-dir", str(b.certs_dir), cluster.big.name))


def run_ctr(args: list[str]) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")


def timed_pulls(
    cluster: MirrorCluster,
    pull: Callable[[MirrorCluster, Way], None],
    way: Way,
    rounds: int,
) -> list[float]:
    """Seconds of each of ``rounds`` pulls, from ctr's start (wall clock, which the
    content store's file times are on) to its exit or to the last blob's commit."""
    b, big = cluster.b, cluster.big
    times = []
    for _ in range(rounds):
        b.remove_image(big.name, big.digests)
        started = time.time()
        pull(cluster, way)
        ended = time.time()
        if not set(big.digests) <= b.content():
            raise RuntimeError(f"B lacks some of the image's content after {way.name}")
        if way.unpacks and b.image_digest(big.name) != big.index_digest:
            raise RuntimeError(f"B does not hold the image after {way.name}")
        if not way.unpacks:
            ended = max(b.blob_path(digest).stat().st_mtime for digest in big.digests)
        times.append(ended - started)
    b.remove_image(big.name, big.digests)
    return times


def curl_speed(url: str) -> float:
    """MB/s of one download to /dev/null."""
    result = subprocess.run(
        ["curl", "-sf", "-o", "/dev/null", "-w", "%{speed_download}", url],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return float(result.stdout) / 1e6


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(cluster: MirrorCluster, rounds: int) -> None:
    big = cluster.big
    image_mib = sum(big.size(d) for d in big.digests) / (1 << 20)
    print(f"image: {big.name}, {image_mib:.0f} MiB in {len(big.layer_digests)} layers")
    cluster.a.pull(big.name)
    deadline = time.monotonic() + 30
    while cluster.a.address not in cluster.b.lookup(big.layer_digests[0]):
        if time.monotonic() > deadline:
            raise RuntimeError("A's advertisement never reached B")
        time.sleep(0.2)

    ways = (PULL, FETCH)
    with upstream_limited(cluster):
        limited = {way: timed_pulls(cluster, pull_direct, way, min(rounds, 2)) for way in ways}
    mirrored: dict[Way, list[float]] = {way: [] for way in ways}
    local: dict[Way, list[float]] = {way: [] for way in ways}
    upstream_blobs = dict.fromkeys(ways, 0)
    for _ in range(rounds):
        for way in ways:
            with upstream_limited(cluster):
                since = cluster.upstream.log_offset()
                mirrored[way] += timed_pulls(cluster, pull_through_spegel, way, 1)
                requests = cluster.upstream.requests(since)
                upstream_blobs[way] += sum("/blobs/" in r.uri for r in requests)
            local[way] += timed_pulls(cluster, pull_direct, way, 1)
    for way in ways:
        report(way, limited[way], mirrored[way], local[way], upstream_blobs[way])

    layer = big.layer_digests[0]
    local_speeds, forwarded_speeds = [], []
    for _ in range(5):
        local_speeds.append(curl_speed(cluster.blob_url(cluster.a, big, layer)))
        forwarded_speeds.append(curl_speed(cluster.blob_url(cluster.b, big, layer)))
    local_mbs, forwarded_mbs = statistics.median(local_speeds), statistics.median(forwarded_speeds)
    print(f"blob of {big.size(layer) / (1 << 20):.0f} MiB with curl, median of 5:")
    print(f"  local (A, sendfile):    {local_mbs:7.0f} MB/s")
    print(f"  forwarded (B from A):   {forwarded_mbs:7.0f} MB/s")
    print(f"  forwarded / local:      {forwarded_mbs / local_mbs:7.2f}")
    if cluster.b.pid is not None:
        print(f"B's spegel-tx peak RSS: {peak_rss_mib(cluster.b.pid):.0f} MiB")


def report(
    way: Way, limited: list[float], mirrored: list[float], local: list[float], upstream_blobs: int
) -> None:
    a, b, c = (statistics.median(t) for t in (limited, mirrored, local))
    print(f"{way.name}:")
    print(f"  (a) upstream at {LIMIT}:       {a:6.2f} s  {[round(t, 2) for t in limited]}")
    print(f"  (b) through spegel-tx (from A): {b:6.2f} s  {[round(t, 2) for t in mirrored]}")
    print(f"  (c) upstream unlimited:         {c:6.2f} s  {[round(t, 2) for t in local]}")
    print(f"  improvement of (b) over (a): {100 * (1 - b / a):.1f}%  (Spegel 81%; target > 85%)")
    print(f"    the most any mirror could gain here, 1 - (c)/(a): {100 * (1 - c / a):.1f}%")
    print(f"  (b)/(c): {b / c:.2f}  (target <= 1.10)")
    print(f"  blob requests the upstream saw during (b): {upstream_blobs}")


def exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    """Turn SIGTERM into SystemExit, so the shaping and the cluster are undone on the way out."""
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="pulls per way (median)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    with (
        tempfile.TemporaryDirectory(prefix="spegel-bench-pull-") as base,
        running_cluster(Path(base)) as cluster,
    ):
        measure(cluster, max(1, min(args.rounds, 10)))


if __name__ == "__main__":
    main()
