"""DHT benchmark: lookup latency on real nodes, hops and messages against log2(N), and the
cost of advertising 10,000 keys, each beside a reference measured in the same run.

    python3 bench/dht.py [--nodes 20] [--rounds 20] [--sizes 10,100,300,1000]
                         [--sim-lookups 40] [--keys 10000] [--advertise-nodes 300]
                         [--datagram-rounds 20000]

Prints five tables (about 2.5 minutes on 2 cores, most of it joining 1,000 simulated nodes):

1. Simulation (SimulatedCluster: task.Clock, in-memory UDP, 1 ms one way): per cluster
   size, the hops to the first provider and of the whole search, requests and datagrams
   per lookup, beside log2(N) and a least-squares slope against it. Hops are counted from
   outside by wrapping the origin's ``protocol.request``: its table's contacts are hop 1,
   a node first named in an answer from a hop-h node is hop h+1.
2. One node of ``--advertise-nodes`` simulated nodes advertising ``--keys`` keys in one
   call: simulated time, datagrams, bytes, and whether each record sits on the k closest
   nodes; beside 100 keys advertised one call each (times keys/100) and the AddProvider floor.
3. ``--nodes`` real ``twistd -n spegel`` processes on 127.0.2.x over real UDP: the search's
   own elapsed_ms from /debug/lookup and its HTTP round trip, beside the HTTP round trip of
   /debug/peers, a Twisted UDP echo between two processes and one GetProviders request;
   also the time to the first provider from a router in this process. The nodes share one
   private containerd, each with its own namespace holding one distinct image (5 keys),
   imported once the cluster has joined: every key is advertised by its node's own state
   tracker, over UDP, as in production.
4. ``--keys`` keys advertised over real UDP to those nodes by a KademliaRouter in this
   process (the class twistd runs, on a real socket, joined like a node): one call, calls
   of 250 in series, and 100 keys one call each as the reference; records the twistd nodes
   stored, timeouts, and this router's table before and after.
5. What one datagram costs a node's CPU, in this process: answering a GetProviders (20
   contacts, 3 providers) and storing a 34-key AddProvider, unsigned and signed, beside
   decoding the same datagram alone.

Needs Debian's containerd (``ctr``). Talks only to 127.0.0.0/8; every process it starts
(one containerd, the nodes, a UDP echo server) is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from subprocess import Popen
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import threads  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.defer import Deferred, DeferredList, gatherResults  # noqa: E402
from twisted.internet.protocol import DatagramProtocol  # noqa: E402
from twisted.internet.task import Clock, deferLater  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from spegel_tx import testing  # noqa: E402
from spegel_tx.routing.kademlia.codec import MAX_KEYS_PER_DATAGRAM, decode, encode  # noqa: E402
from spegel_tx.routing.kademlia.limits import Limits  # noqa: E402
from spegel_tx.routing.kademlia.messages import (  # noqa: E402
    AddProvider,
    Binding,
    Body,
    Contact,
    GetProviders,
    Header,
    Message,
    Nodes,
    Provider,
    Providers,
)
from spegel_tx.routing.kademlia.node import distance, key_id  # noqa: E402
from spegel_tx.routing.kademlia.protocol import KademliaProtocol  # noqa: E402
from spegel_tx.routing.kademlia.router import KademliaRouter  # noqa: E402
from tests.support.containerd import Containerd  # noqa: E402
from tests.support.ociimage import SyntheticImage, build_image  # noqa: E402
from tests.support.processes import (  # noqa: E402
    free_ports,
    log_tail,
    start_process,
    start_spegel,
    stop_process,
    wait_for_http,
)

NODE_NET = "127.0.2"
ECHO_HOST = "127.0.3.1"
BENCH_HOST = "127.0.3.2"
TARGET_P99_MS = 5.0
K = 20

ECHO_SERVER = """
import sys
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol

class Echo(DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)

reactor.listenUDP(int(sys.argv[2]), Echo(), interface=sys.argv[1])
reactor.run()
"""


# Small helpers


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = mean(xs), mean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def digest_key(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class OverBudget(BaseException):
    """A simulation ran past its wall-clock budget."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise OverBudget in the main thread once the block has run ``seconds``.

    A Deferred turns what a callback raises into a Failure, so the alarm fires again
    every 50 ms until the exception escapes into the block's own code.
    """

    def expired(signum: int, frame: Any) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        raise OverBudget(f"over {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def section(title: str) -> None:
    print()
    print(title)
    print("-" * len(title))


# Counting requests and hops from outside the lookup code


class RequestTracker:
    """Wraps one protocol's ``request`` (an instance attribute shadowing the method).

    For the search towards ``target`` it counts requests and gives each node a hop:
    contacts in the origin's table are hop 1, a node first named in an answer from a
    hop-h node is hop h+1. ``first_hops`` is the hop of the node whose answer first
    named a provider (0: the origin held the record itself). Every other request is
    only counted by body type.
    """

    def __init__(self, protocol: KademliaProtocol) -> None:
        self._protocol = protocol
        self._original = protocol.request
        protocol.request = self._request  # type: ignore[method-assign]
        self.by_type: Counter[str] = Counter()
        self.target: bytes | None = None
        self.hops: dict[bytes, int] = {}
        self.requests = 0
        self.max_hops = 0
        self.first_hops: int | None = None

    def begin(self, target: bytes | None) -> None:
        self.target = target
        self.hops = {c.node_id: 1 for c in self._protocol.table.contacts()}
        self.requests = 0
        self.max_hops = 0
        self.first_hops = None
        own = self._protocol.node_id
        if target is not None and any(
            p.node_id != own for p in self._protocol.records.providers_of(target)
        ):
            self.first_hops = 0

    def close(self) -> None:
        del self._protocol.request

    def _request(self, contact: Contact, body: Body, evicts: bool = True) -> Deferred[Message]:
        self.by_type[type(body).__name__] += 1
        result = self._original(contact, body, evicts)
        aim = getattr(body, "key", getattr(body, "target", None))
        if self.target is None or aim != self.target:
            return result
        self.requests += 1
        hop = self.hops.setdefault(contact.node_id, 1)
        self.max_hops = max(self.max_hops, hop)
        result.addCallback(self._answered, hop)
        return result

    def _answered(self, message: Message, hop: int) -> Message:
        body = message.body
        closer: tuple[Contact, ...] = ()
        if isinstance(body, Providers):
            own = self._protocol.node_id
            if self.first_hops is None and any(p.node_id != own for p in body.providers):
                self.first_hops = hop
            closer = body.closer
        elif isinstance(body, Nodes):
            closer = body.contacts
        for contact in closer:
            self.hops.setdefault(contact.node_id, hop + 1)
        return message


# 1 and 2: the simulated cluster


def totals(routers: Sequence[KademliaRouter], *names: str) -> int:
    return sum(r.protocol.counters[name] for r in routers for name in names)


@dataclass
class SimLookups:
    size: int
    build_seconds: float
    table_mean: float
    first_hops: list[int] = field(default_factory=list)
    search_hops: list[int] = field(default_factory=list)
    first_requests: list[int] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    datagrams: list[int] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)
    found: int = 0


def simulate_lookups(
    cluster: testing.SimulatedCluster, lookups: int, seed: int, build_seconds: float
) -> SimLookups:
    routers = cluster.routers
    size = len(routers)
    rng = random.Random(seed)
    owners = [rng.randrange(size) for _ in range(lookups)]
    keys = [digest_key(f"sim-{size}-{i}") for i in range(lookups)]
    cluster.wait(
        gatherResults([routers[o].advertise([k]) for o, k in zip(owners, keys, strict=True)])
    )
    result = SimLookups(size, build_seconds, mean([len(r.protocol.table) for r in routers]))
    for owner, key in zip(owners, keys, strict=True):
        origin = rng.choice([i for i in range(size) if i != owner])
        router = routers[origin]
        tracker = RequestTracker(router.protocol)
        tracker.begin(key_id(key))
        before = totals(routers, "datagrams_out")
        started = cluster.clock.seconds()
        marks: dict[str, float] = {}

        async def drain(
            router: KademliaRouter = router,
            key: str = key,
            marks: dict[str, float] = marks,
            tracker: RequestTracker = tracker,
        ) -> int:
            lookup = router.lookup(key, K)
            found = 0
            while (await lookup.next_provider()) is not None:
                if not found:
                    marks["first_at"] = cluster.clock.seconds()
                    marks["first_requests"] = tracker.requests
                found += 1
            return found

        try:
            found = cluster.wait(Deferred.fromCoroutine(drain()), limit=30)
        finally:
            tracker.close()
        if isinstance(found, Failure):
            found.raiseException()
        result.requests.append(tracker.requests)
        result.search_hops.append(tracker.max_hops)
        result.datagrams.append(totals(routers, "datagrams_out") - before)
        if found:
            result.found += 1
            result.first_hops.append(tracker.first_hops if tracker.first_hops is not None else -1)
            result.first_requests.append(int(marks["first_requests"]))
            result.first_ms.append((marks["first_at"] - started) * 1000)
    return result


def print_sim_lookups(results: Sequence[SimLookups], lookups: int) -> None:
    section("1. Lookups in simulation (in-memory UDP, 1 ms one way, task.Clock)")
    print(
        f"{lookups} lookups per size, each for a key one other node advertised; the search "
        f"wants {K} providers, so it runs on after the first until the {K} closest answered."
    )
    print(
        "hops: to the node whose answer first named the provider (0: the origin stored the "
        "record itself) / deepest node the whole search asked."
    )
    print(
        f"{'nodes':>6} {'log2 N':>6} {'table':>6} {'hops first':>11} {'search hops':>12} "
        f"{'req first':>10} {'req all':>8} {'dgrams':>7} {'first ms':>9} {'found':>6} "
        f"{'build s':>8}"
    )
    for r in results:
        print(
            f"{r.size:>6} {math.log2(r.size):>6.2f} {r.table_mean:>6.1f} "
            f"{mean(r.first_hops):>5.2f} ({max(r.first_hops, default=0)}) "
            f"{mean(r.search_hops):>6.2f} ({max(r.search_hops, default=0)}) "
            f"{mean(r.first_requests):>10.1f} {mean(r.requests):>8.1f} "
            f"{mean(r.datagrams):>7.1f} {mean(r.first_ms):>9.2f} "
            f"{r.found:>3}/{len(r.requests):<2} {r.build_seconds:>8.1f}"
        )
    print(
        "columns: table = mean routing-table size; hops = mean (max); search hops = the "
        "deepest node the search asked; req = requests the origin sent (until the first "
        "provider / in all); dgrams = datagrams the whole cluster sent during the lookup; "
        "first ms = simulated time to the first provider; build s = wall time to join."
    )
    if len(results) >= 2:
        xs = [math.log2(r.size) for r in results]
        for label, ys in (
            ("hops to the first provider", [mean(r.first_hops) for r in results]),
            ("search hops", [mean(r.search_hops) for r in results]),
            ("requests to the first provider", [mean(r.first_requests) for r in results]),
        ):
            print(
                f"least squares against log2 N: {label} grow {slope(xs, ys):.3f} per doubling "
                "of N (the log2 N line itself: 1.000)"
            )


@dataclass
class Advertised:
    label: str
    keys: int
    seconds: float
    origin_out: int
    origin_in: int
    origin_bytes: int
    cluster_datagrams: int
    cluster_bytes: int
    by_type: Counter[str]
    extra: str = ""


def simulate_advertise(
    cluster: testing.SimulatedCluster, count: int, reference_keys: int, seed: int
) -> tuple[Advertised, Advertised, str]:
    routers = cluster.routers
    size = len(routers)
    origin = routers[random.Random(seed).randrange(size)]
    keys = [digest_key(f"bulk-{seed}-{i}") for i in range(count)]

    def measure(label: str, run: Callable[[], None], n: int) -> Advertised:
        tracker = RequestTracker(origin.protocol)
        counters = origin.protocol.counters
        before = (counters["datagrams_out"], counters["datagrams_in"])
        before_bytes = counters["bytes_out"] + counters["bytes_in"]
        before_all = totals(routers, "datagrams_out")
        before_all_bytes = totals(routers, "bytes_out")
        started = cluster.clock.seconds()
        try:
            run()
        finally:
            tracker.close()
        return Advertised(
            label,
            n,
            cluster.clock.seconds() - started,
            counters["datagrams_out"] - before[0],
            counters["datagrams_in"] - before[1],
            counters["bytes_out"] + counters["bytes_in"] - before_bytes,
            totals(routers, "datagrams_out") - before_all,
            totals(routers, "bytes_out") - before_all_bytes,
            tracker.by_type,
        )

    def bulk() -> None:
        result = cluster.wait(origin.advertise(keys), limit=600)
        if isinstance(result, Failure):
            result.raiseException()

    singles = [digest_key(f"single-{seed}-{i}") for i in range(reference_keys)]

    def one_by_one() -> None:
        for key in singles:
            result = cluster.wait(origin.advertise([key]), limit=60)
            if isinstance(result, Failure):
                result.raiseException()

    bulk_result = measure(f"{count} keys, one advertise() call", bulk, count)
    single_result = measure(f"{reference_keys} keys, one call each", one_by_one, reference_keys)

    # Were the records put on the k closest nodes? Checked on a sample, by brute force.
    own = origin.protocol.node_id
    sample = random.Random(seed + 1).sample(keys, min(50, len(keys)))
    exact = 0
    for key in sample:
        target = key_id(key)
        holders = {
            r.protocol.node_id
            for r in routers
            if any(p.node_id == own for p in r.protocol.records.providers_of(target))
        }
        others = [r.protocol.node_id for r in routers if r.protocol.node_id != own]
        closest = set(sorted(others, key=lambda n: distance(n, target))[:K])
        exact += holders == closest
    check = f"records on exactly the {K} closest nodes: {exact}/{len(sample)} sampled keys"
    return bulk_result, single_result, check


def print_advertise(
    title: str,
    runs: Sequence[Advertised],
    reference: Advertised,
    time_unit: str,
    replicas: int,
    notes: Sequence[str],
) -> None:
    section(title)
    keys = max(a.keys for a in runs)
    scale = keys / reference.keys
    print(
        f"{'':<36} {time_unit:>9} {'origin out':>11} {'origin in':>10} "
        f"{'origin MB':>10} {'cluster dg':>11} {'cluster MB':>11}"
    )

    def row(label: str, a: Advertised, factor: float) -> None:
        print(
            f"{label:<36} {a.seconds * factor:>9.2f} {a.origin_out * factor:>11.0f} "
            f"{a.origin_in * factor:>10.0f} {a.origin_bytes * factor / 1e6:>10.2f} "
            f"{a.cluster_datagrams * factor:>11.0f} {a.cluster_bytes * factor / 1e6:>11.2f}"
        )

    for a in runs:
        row(a.label, a, 1)
    row(reference.label, reference, 1)
    row(f"  reference: that x {scale:.0f}", reference, scale)
    floor = math.ceil(keys * replicas / MAX_KEYS_PER_DATAGRAM)
    print(
        f"floor: {keys} keys x {replicas} replicas / {MAX_KEYS_PER_DATAGRAM} keys per "
        f"datagram = {floor} AddProvider requests, {keys * replicas * 32 / 1e6:.2f} MB "
        "of key ids"
    )
    for a in runs:
        kinds = ", ".join(f"{n} {name}" for name, n in sorted(a.by_type.items()))
        print(f"requests the origin sent ({a.label}): {kinds}")
    for note in notes:
        print(note)


# 3 and 4: real processes


@dataclass
class RealNode:
    index: int
    host: str
    registry_port: int
    router_port: int
    metrics_port: int
    namespace: str
    process: Popen[bytes]
    log_path: Path
    image: SyntheticImage | None = None
    connection: http.client.HTTPConnection | None = None

    @property
    def keys(self) -> list[str]:
        assert self.image is not None
        return [self.image.name, *self.image.digests]

    def get(self, path: str) -> tuple[float, dict[str, Any]]:
        """GET on the metrics address over one kept-alive connection: (ms, JSON)."""
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection(
                    self.host, self.metrics_port, timeout=10
                )
            try:
                started = time.perf_counter()
                self.connection.request("GET", path)
                response = self.connection.getresponse()
                body = response.read()
                elapsed = (time.perf_counter() - started) * 1000
            except (OSError, http.client.HTTPException):
                self.connection.close()
                self.connection = None
                if attempt:
                    raise
                continue
            if response.status != 200:
                raise RuntimeError(f"{self.host} {path}: HTTP {response.status}")
            return elapsed, json.loads(body)
        raise AssertionError("unreachable")


def start_nodes(count: int, containerd: Containerd, work: Path) -> list[RealNode]:
    nodes: list[RealNode] = []
    seeds: list[str] = []
    for index in range(count):
        host = f"{NODE_NET}.{index + 1}"
        registry_port, router_port, metrics_port = free_ports(host, 3)
        if index < 2:
            seeds.append(f"{host}:{router_port}")
        namespace = f"bench-node{index}"
        config = {
            "registry-addr": f"{host}:{registry_port}",
            "router-addr": f"{host}:{router_port}",
            "metrics-addr": f"{host}:{metrics_port}",
            "containerd-sock": containerd.address,
            "containerd-namespace": namespace,
            "containerd-content-path": containerd.content_path,
            "static-bootstrap-peers": list(seeds),
        }
        process, log_path = start_spegel(config, work / f"node{index}")
        nodes.append(
            RealNode(
                index,
                host,
                registry_port,
                router_port,
                metrics_port,
                namespace,
                process,
                log_path,
            )
        )
    return nodes


def poll(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def wait_joined(nodes: Sequence[RealNode], timeout: float) -> list[int]:
    """Wait until every node knows every other one; the peer counts at the end."""
    for node in nodes:
        wait_for_http(
            f"http://{node.host}:{node.metrics_port}/debug/peers",
            node.process,
            node.log_path,
            timeout,
        )
    want = len(nodes) - 1

    def peer_counts() -> list[int]:
        return [len(node.get("/debug/peers")[1]["peers"]) for node in nodes]

    poll(lambda: min(peer_counts()) >= want, timeout, 0.25)
    return peer_counts()


def provider_found(node: RealNode, key: str, owner: RealNode) -> bool:
    _, answer = node.get(f"/debug/lookup?key={urllib.parse.quote(key)}")
    return any(
        p["host"] == owner.host and p["registry_port"] == owner.registry_port
        for p in answer["providers"]
    )


def advertised_by(owner: RealNode, nodes: Sequence[RealNode]) -> bool:
    """Two other nodes find ``owner`` for its image name and its layer."""
    return provider_found(
        nodes[(owner.index + 1) % len(nodes)], owner.keys[0], owner
    ) and provider_found(nodes[(owner.index + 2) % len(nodes)], owner.keys[-1], owner)


@dataclass
class RealLookups:
    elapsed_ms: list[float] = field(default_factory=list)
    http_ms: list[float] = field(default_factory=list)
    reference_http_ms: list[float] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    found: int = 0
    datagram_bytes: list[float] = field(default_factory=list)


def measure_real_lookups(
    nodes: Sequence[RealNode], rounds: int, seed: int, budget: float
) -> RealLookups:
    """Round-robin over the nodes: /debug/peers (reference round trip and counters), one
    /debug/lookup for a key another node holds, /debug/peers again. Round 0 is warm-up."""
    rng = random.Random(seed)
    result = RealLookups()
    deadline = time.monotonic() + budget
    for round_number in range(rounds + 1):
        if time.monotonic() > deadline:
            print(f"(lookup rounds stopped at {round_number - 1} of {rounds}: time budget)")
            break
        for node in nodes:
            owner = rng.choice([n for n in nodes if n is not node])
            key = rng.choice(owner.keys)
            reference_ms, before = node.get("/debug/peers")
            http_ms, answer = node.get(f"/debug/lookup?key={urllib.parse.quote(key)}")
            _, after = node.get("/debug/peers")
            if round_number == 0:
                continue
            result.reference_http_ms.append(reference_ms)
            result.http_ms.append(http_ms)
            result.elapsed_ms.append(float(answer["elapsed_ms"]))
            sent = after["counters"]["datagrams_out"] - before["counters"]["datagrams_out"]
            result.requests.append(sent)
            result.found += any(
                p["host"] == owner.host and p["registry_port"] == owner.registry_port
                for p in answer["providers"]
            )
            counters = after["counters"]
            result.datagram_bytes.append(counters["bytes_out"] / max(1, counters["datagrams_out"]))
    return result


class EchoClient(DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: Deferred[float] | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.callback(time.perf_counter())


async def echo_round_trips(
    reactor: Any, address: tuple[str, int], size: int, count: int
) -> tuple[list[float], int]:
    """Sequential round trips of a ``size``-byte datagram to a Twisted echo process (ms)."""
    client = EchoClient()
    port = reactor.listenUDP(0, client, interface=BENCH_HOST)
    transport = client.transport
    assert transport is not None
    payload = os.urandom(size)
    rtts: list[float] = []
    lost = 0
    try:
        for attempt in range(100):  # wait until the echo process listens, at most ~10 s
            client.waiting = Deferred()
            transport.write(payload, address)
            try:
                await client.waiting.addTimeout(0.1, reactor)
                break
            except Exception:
                client.waiting = None
                if attempt == 99:
                    raise RuntimeError("the UDP echo process never answered") from None
        for _ in range(count):
            client.waiting = Deferred()
            started = time.perf_counter()
            transport.write(payload, address)
            try:
                answered = await client.waiting.addTimeout(1.0, reactor)
            except Exception:
                client.waiting = None
                lost += 1
                continue
            rtts.append((answered - started) * 1000)
    finally:
        await port.stopListening()
    return rtts, lost


@dataclass
class Phase2:
    echo_ms: list[float] = field(default_factory=list)
    echo_lost: int = 0
    echo_size: int = 0
    request_ms: list[float] = field(default_factory=list)
    request_failed: int = 0
    first_ms: list[float] = field(default_factory=list)
    first_hops: list[int] = field(default_factory=list)
    first_requests: list[int] = field(default_factory=list)
    bench_table: int = 0
    advertised: list[Advertised] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _receive_buffer() -> str:
    try:
        default = Path("/proc/sys/net/core/rmem_default").read_text().strip()
        largest = Path("/proc/sys/net/core/rmem_max").read_text().strip()
    except OSError:
        return "unknown"
    return f"rmem_default {default} B, rmem_max {largest} B"


async def phase2(
    reactor: Any,
    nodes: Sequence[RealNode],
    echo_address: tuple[str, int],
    echo_size: int,
    samples: int,
    key_count: int,
    seed: int,
) -> Phase2:
    out = Phase2(echo_size=echo_size)
    out.echo_ms, out.echo_lost = await echo_round_trips(reactor, echo_address, echo_size, samples)

    # A router of our own (the class twistd runs), on a real UDP socket, joins the cluster.
    router_port = free_ports(BENCH_HOST, 1)[0]
    protocol = KademliaProtocol(reactor, os.urandom(32), registry_port=router_port)
    port = reactor.listenUDP(router_port, protocol, interface=BENCH_HOST)
    seeds = [(n.host, n.router_port) for n in nodes[:2]]
    router = KademliaRouter(reactor, protocol, testing.FixedBootstrapper(seeds), router_port)
    router.startService()
    rng = random.Random(seed)
    all_keys = [key for node in nodes for key in node.keys]
    try:
        for _ in range(200):  # at most ~10 s
            if len(protocol.table) >= len(nodes):
                break
            await deferLater(reactor, 0.05)
        await deferLater(reactor, 1.0)  # let the join's bucket searches end
        out.bench_table = len(protocol.table)

        # One DHT request and its answer, to a twistd node: the unit a lookup is made of.
        contacts = protocol.table.contacts()
        for _ in range(samples if contacts else 0):
            contact = rng.choice(contacts)
            started = time.perf_counter()
            try:
                await protocol.request(contact, GetProviders(key_id(rng.choice(all_keys))))
            except Exception:
                out.request_failed += 1
                continue
            out.request_ms.append((time.perf_counter() - started) * 1000)

        # Time to the first provider, for keys the twistd nodes advertised.
        for _ in range(5 * len(nodes)):
            key = rng.choice(all_keys)
            tracker = RequestTracker(protocol)
            tracker.begin(key_id(key))
            started = time.perf_counter()
            try:
                lookup = router.lookup(key, 1)
                provider = await lookup.next_provider().addTimeout(3.0, reactor)
            finally:
                tracker.close()
            if provider is not None:
                out.first_ms.append((time.perf_counter() - started) * 1000)
                out.first_hops.append(tracker.first_hops if tracker.first_hops else 0)
                out.first_requests.append(tracker.requests)
            await deferLater(reactor, 0.002)

        async def cluster_counters() -> tuple[int, int, int]:
            pages = await DeferredList(
                [threads.deferToThread(n.get, "/debug/peers") for n in nodes],
                consumeErrors=True,
            )
            datagrams = bytes_out = stored = 0
            for ok, page in pages:
                if ok:
                    datagrams += page[1]["counters"].get("datagrams_out", 0)
                    bytes_out += page[1]["counters"].get("bytes_out", 0)
                    stored += page[1]["records_stored"]
            return datagrams, bytes_out, stored

        async def measure(label: str, keys: list[str], batch: int) -> Advertised:
            """Advertise ``keys`` in calls of ``batch`` keys, one call after the other."""
            tracker = RequestTracker(protocol)
            counters = protocol.counters
            before = dict(counters)
            table_before = len(protocol.table)
            cluster_before = await cluster_counters()
            started = time.perf_counter()
            try:
                for i in range(0, len(keys), batch):
                    await router.advertise(keys[i : i + batch]).addTimeout(60.0, reactor)
            finally:
                tracker.close()
            seconds = time.perf_counter() - started
            await deferLater(reactor, 0.6)  # late answers and timeouts land in the counters
            cluster_after = await cluster_counters()
            delta = {name: counters[name] - before.get(name, 0) for name in counters}
            stored = cluster_after[2] - cluster_before[2]
            expected = len(keys) * min(K, len(nodes))
            extra = (
                f"{label}: {stored} of {expected} records stored on the twistd nodes; "
                f"origin timeouts {delta.get('timeouts', 0)}, send errors "
                f"{delta.get('send_errors', 0)}; this process's table "
                f"{table_before} -> {len(protocol.table)} peers"
            )
            return Advertised(
                label,
                len(keys),
                seconds,
                delta.get("datagrams_out", 0),
                delta.get("datagrams_in", 0),
                delta.get("bytes_out", 0) + delta.get("bytes_in", 0),
                delta.get("datagrams_out", 0) + cluster_after[0] - cluster_before[0],
                delta.get("bytes_out", 0) + cluster_after[1] - cluster_before[1],
                tracker.by_type,
                extra,
            )

        # The burst of one big call goes last: what it does to the table is part of the result.
        paced = 250
        runs = [
            (
                "100 keys, one call each",
                [digest_key(f"real-single-{seed}-{i}") for i in range(100)],
                1,
            ),
            (
                f"{key_count} keys, calls of {paced} in series",
                [digest_key(f"real-paced-{seed}-{i}") for i in range(key_count)],
                paced,
            ),
            (
                f"{key_count} keys, one advertise() call",
                [digest_key(f"real-bulk-{seed}-{i}") for i in range(key_count)],
                key_count,
            ),
        ]
        for label, keys, batch in runs:
            result = await measure(label, keys, batch)
            out.advertised.append(result)
            out.notes.append(result.extra)
        out.notes.append(f"UDP receive buffers: {_receive_buffer()}")

        # Can the twistd nodes find the last call's keys? One request at a time: each node
        # has one HTTP connection.
        sample = rng.sample(runs[-1][1], 20)

        def found_by_nodes() -> int:
            return sum(
                any(
                    p["host"] == BENCH_HOST
                    for p in nodes[i % len(nodes)].get(
                        f"/debug/lookup?key={urllib.parse.quote(key)}"
                    )[1]["providers"]
                )
                for i, key in enumerate(sample)
            )

        seen = await threads.deferToThread(found_by_nodes)
        out.notes.append(
            f"twistd nodes' /debug/lookup found this process for {seen}/20 of those keys"
        )
    finally:
        counters = protocol.counters
        before_out = counters["datagrams_out"]
        total = sum(a.keys for a in out.advertised)
        started = time.perf_counter()
        stopped: Deferred[Any] | None = router.stopService()
        if stopped is not None:
            try:
                await stopped.addTimeout(10.0, reactor)
            except Exception as e:
                out.notes.append(f"withdrawal on stop did not finish: {e!r}")
        out.notes.append(
            f"withdrawing all {total} keys on stop: "
            f"{(time.perf_counter() - started) * 1000:.0f} ms, "
            f"{counters['datagrams_out'] - before_out} datagrams out"
        )
        await port.stopListening()
    return out


def run_reactor(work: Callable[[Any], Deferred[Any]], limit: float) -> Any:
    """Run the global reactor once until ``work`` finishes (at most ``limit`` seconds);
    its result, or raise."""
    from twisted.internet import reactor

    results: list[Any] = []
    reactor.callLater(limit, reactor.stop)

    def go() -> None:
        d = work(reactor)
        d.addBoth(results.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    if not results:
        raise RuntimeError("the reactor stopped before the benchmark finished")
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def print_real_lookups(
    nodes: Sequence[RealNode], lookups: RealLookups, phase: Phase2, peer_counts: Sequence[int]
) -> None:
    section(f"3. Lookups on {len(nodes)} real twistd nodes over UDP on 127.0.2.x")
    n = len(lookups.elapsed_ms)
    print(
        f"{n} lookups (/debug/lookup, wants {K} providers, so in a cluster of {len(nodes)} "
        f"it asks every node before answering); peers known per node: "
        f"{min(peer_counts)}..{max(peer_counts)}; provider found in {lookups.found}/{n}"
    )
    print(f"{'':<52} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")

    def row(label: str, values: Sequence[float]) -> None:
        print(
            f"{label:<52} {percentile(values, 0.5):>8.3f} {percentile(values, 0.99):>8.3f} "
            f"{max(values, default=math.nan):>8.3f}"
        )

    row("DHT lookup, elapsed_ms reported by the node", lookups.elapsed_ms)
    row("HTTP round trip of /debug/lookup", lookups.http_ms)
    row("  reference: HTTP round trip of /debug/peers", lookups.reference_http_ms)
    row(
        f"  reference: Twisted UDP echo, {phase.echo_size} B, 2 processes",
        phase.echo_ms,
    )
    row("  reference: one GetProviders request to a node", phase.request_ms)
    row("first provider, lookup(key, 1) from this process", phase.first_ms)
    p99 = percentile(lookups.elapsed_ms, 0.99)
    verdict = "meets" if p99 < TARGET_P99_MS else "misses"
    first_p99 = percentile(phase.first_ms, 0.99)
    first_verdict = "meets" if first_p99 < TARGET_P99_MS else "misses"
    lookup_p50 = percentile(lookups.elapsed_ms, 0.5)
    print(
        f"target p99 < {TARGET_P99_MS} ms: the whole search {verdict} it ({p99:.3f} ms); "
        f"the first provider {first_verdict} it ({first_p99:.3f} ms)"
    )
    print(
        f"search p50 = {lookup_p50 / percentile(phase.echo_ms, 0.5):.1f} echo round trips "
        f"= {lookup_p50 / percentile(phase.request_ms, 0.5):.1f} GetProviders round trips "
        f"(failed requests: {phase.request_failed})"
    )
    print(
        f"requests the origin sent per lookup: mean {mean(lookups.requests):.1f} "
        f"(log2 {len(nodes)} = {math.log2(len(nodes)):.2f}); "
        f"first provider from this process: hops mean {mean(phase.first_hops):.2f}, "
        f"requests mean {mean(phase.first_requests):.1f}; echo lost {phase.echo_lost}; "
        f"this process's table: {phase.bench_table} peers"
    )


# 5. One datagram's cost


class _Wire:
    """A UDP transport that only counts what the node writes."""

    def __init__(self, host: str) -> None:
        self._host = host
        self.written = 0

    def write(self, data: bytes, addr: Any = None) -> None:
        self.written += 1

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", self._host, 5001)


@dataclass
class DatagramCost:
    label: str
    handled_us: float
    decoded_us: float


def datagram_costs(rounds: int, seed: int) -> list[DatagramCost]:
    """Microseconds per datagram through ``datagramReceived`` (answer written), and for
    ``decode`` alone on the same datagrams. The answer allowance is set out of reach,
    so every answer is whole, as for peers that ask at a normal pace."""
    rng = random.Random(seed)
    secret = b"bench cluster secret 0123456789"
    limits = Limits(answer_burst=10**12, answer_burst_total=10**12)
    results = []
    for signed in (False, True):
        key = rng.randbytes(32)
        node = KademliaProtocol(
            Clock(), rng.randbytes(32), 5000, secret=secret if signed else None, limits=limits
        )
        node.makeConnection(_Wire("10.0.0.1"))
        peers = [Contact(rng.randbytes(32), f"10.0.1.{n}", 5001) for n in range(20)]
        for peer in peers:
            node.table.seen(peer, 0.0)
        for n in range(3):
            node.records.store(key, Provider(rng.randbytes(32), f"10.0.2.{n}", 5000))
        asker = peers[0]
        keys = tuple(rng.randbytes(32) for _ in range(MAX_KEYS_PER_DATAGRAM))
        for body in (GetProviders(key), AddProvider(keys)):
            binding = Binding(node.node_id, asker.host, asker.port) if signed else None
            datagrams = [
                encode(
                    Message(Header(rng.randbytes(8), asker.node_id, 5000, 0), body, binding),
                    secret if signed else None,
                )
                for _ in range(rounds)
            ]
            address = (asker.host, asker.port)
            started = time.perf_counter()
            for datagram in datagrams:
                node.datagramReceived(datagram, address)
            handled = (time.perf_counter() - started) / rounds * 1e6
            started = time.perf_counter()
            for datagram in datagrams:
                decode(datagram, secret if signed else None)
            decoded = (time.perf_counter() - started) / rounds * 1e6
            name = type(body).__name__
            results.append(
                DatagramCost(f"{name}, {'signed' if signed else 'unsigned'}", handled, decoded)
            )
    return results


def print_datagram_costs(costs: Sequence[DatagramCost], rounds: int) -> None:
    section("5. What one datagram costs a node (CPU, this process)")
    print(f"{rounds} datagrams each, from a peer in the routing table; answers are only counted")
    print(f"{'':34} {'handled us':>11} {'decode us':>10} {'ratio':>6}")
    for cost in costs:
        print(
            f"{cost.label:34} {cost.handled_us:11.1f} {cost.decoded_us:10.1f} "
            f"{cost.handled_us / cost.decoded_us:6.1f}"
        )
    print("reference: decode us is the wire format's own cost of the same datagram")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sizes", default="10,100,300,1000")
    parser.add_argument("--sim-lookups", type=int, default=40)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--advertise-nodes", type=int, default=300)
    parser.add_argument(
        "--sim-budget", type=float, default=240.0, help="wall seconds for any one cluster size"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--datagram-rounds", type=int, default=20_000)
    args = parser.parse_args()
    if not 2 <= args.nodes <= 250:
        raise SystemExit("--nodes must be between 2 and 250")
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        raise SystemExit("containerd is not installed (apt-get install containerd)")
    sizes = sorted({int(s) for s in args.sizes.split(",")} | {args.advertise_nodes})
    began = time.monotonic()
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)

    work = Path(tempfile.mkdtemp(prefix="spegel-bench-dht-"))
    containerd: Containerd | None = None
    nodes: list[RealNode] = []
    echo: Popen[bytes] | None = None
    try:
        # The real cluster boots (on the other core) while the simulations run.
        containerd = Containerd(work / "containerd")
        containerd.start()
        nodes = start_nodes(args.nodes, containerd, work)
        images = [
            build_image(
                work / f"image{i}",
                name=f"registry.bench/dht/node{i}:v1",
                layer_sizes=(512,),
                seed=1000 + i,
            )
            for i in range(args.nodes)
        ]
        echo_port = free_ports(ECHO_HOST, 1)[0]
        echo = start_process(
            [sys.executable, "-c", ECHO_SERVER, ECHO_HOST, str(echo_port)], work / "echo.log"
        )

        sim_results: list[SimLookups] = []
        advertised: tuple[Advertised, Advertised, str] | None = None
        for size in sizes:
            print(f"simulating {size} nodes ...", flush=True)
            started = time.monotonic()
            cluster: testing.SimulatedCluster | None = None
            try:
                with time_limit(args.sim_budget):
                    cluster = testing.SimulatedCluster(size, seed=args.seed)
                    built = time.monotonic() - started
                    if size in {int(s) for s in args.sizes.split(",")}:
                        sim_results.append(
                            simulate_lookups(cluster, args.sim_lookups, args.seed, built)
                        )
                    if size == args.advertise_nodes:
                        advertised = simulate_advertise(cluster, args.keys, 100, args.seed)
            except OverBudget:
                print(f"  {size} nodes skipped: over --sim-budget {args.sim_budget:.0f}s")
            cluster = None  # free a thousand routers before the next size
        print_sim_lookups(sim_results, args.sim_lookups)
        print_datagram_costs(datagram_costs(args.datagram_rounds, args.seed), args.datagram_rounds)
        if advertised is not None:
            bulk, single, check = advertised
            print_advertise(
                f"2. Advertising {args.keys} keys from one node of {args.advertise_nodes} "
                "simulated nodes",
                [bulk],
                single,
                "sim s",
                K,
                [check, "(sim s: simulated seconds at 1 ms one way; one-by-one runs in series)"],
            )
        sys.stdout.flush()

        # The real cluster: joined first, then each namespace gets its image.
        print(f"\nwaiting for {args.nodes} twistd nodes to join ...", flush=True)
        peer_counts = wait_joined(nodes, timeout=90)
        started = time.monotonic()
        for node, image in zip(nodes, images, strict=True):
            containerd.ctr(
                "images", "import", "--no-unpack", str(image.archive), namespace=node.namespace
            )
            node.image = image
        imported = time.monotonic() - started
        started = time.monotonic()
        converged = all(
            poll(
                partial(advertised_by, node, nodes),
                timeout=max(1.0, 60 - (time.monotonic() - started)),
                interval=0.2,
            )
            for node in nodes
        )
        print(
            f"imported {len(nodes)} images in {imported:.1f}s; every node's keys found by "
            f"others {time.monotonic() - started:.1f}s later"
            + ("" if converged else " (NOT all: some lookups below will miss)"),
            flush=True,
        )
        lookups = measure_real_lookups(nodes, args.rounds, args.seed, budget=90)
        echo_size = round(mean(lookups.datagram_bytes)) if lookups.datagram_bytes else 100
        phase = run_reactor(
            lambda reactor: Deferred.fromCoroutine(
                phase2(
                    reactor,
                    nodes,
                    (ECHO_HOST, echo_port),
                    echo_size,
                    max(100, len(lookups.elapsed_ms)),
                    args.keys,
                    args.seed,
                )
            ),
            limit=180,
        )
        print_real_lookups(nodes, lookups, phase, peer_counts)
        if phase.advertised:
            print_advertise(
                f"4. Advertising {args.keys} keys over real UDP to {args.nodes} twistd nodes "
                "(from a router in this process)",
                phase.advertised[1:],
                phase.advertised[0],
                "wall s",
                min(K, args.nodes),
                phase.notes,
            )
        print(f"\ntotal run time {time.monotonic() - began:.0f}s")
    except BaseException:
        for node in nodes:
            if node.process.poll() is not None:
                print(f"node {node.host} exited:\n{log_tail(node.log_path)}", file=sys.stderr)
        raise
    finally:
        for node in nodes:
            if node.connection is not None:
                node.connection.close()
        for node in reversed(nodes):
            stop_process(node.process)
        if echo is not None:
            stop_process(echo)
        if containerd is not None:
            containerd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
