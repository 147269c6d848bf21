"""Bootstrap: where a node finds its first DHT peers, and how the router keeps (re)joining.

Issue requirements under test:

* ``static``: a list of ``host:port``; ``dns``: every A/AAAA record of
  ``dns-bootstrap-domain`` at our own router port (a Kubernetes headless Service).
* Retried with backoff until at least one peer answers; repeated periodically so a
  partitioned node rejoins. ``ready`` is true once the routing table holds a peer.

The DNS tests run a real twisted.names server on 127.0.0.1 (an ephemeral UDP port)
on the global reactor through pytest-twisted; everything else runs on task.Clock
and the in-memory UDP network, driven event by event.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import InvalidAddressError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, capturedLogs
from twisted.names import authority, client, dns, server
from zope.interface.verify import verifyObject

from spegel_tx.config import Address, parse_address
from spegel_tx.interfaces import IBootstrapper
from spegel_tx.routing.bootstrap import DNSBootstrapper, StaticBootstrapper
from spegel_tx.routing.kademlia.protocol import KademliaProtocol
from spegel_tx.routing.kademlia.router import KademliaRouter
from spegel_tx.testing import MemoryUDPNetwork

ROUTER_PORT = 5001
BOOTSTRAP_NAMESPACE = "spegel_tx.routing.bootstrap"


def warnings_from(events: Any, namespace: str) -> list[LogEvent]:
    return [
        event
        for event in events
        if event.get("log_namespace") == namespace and event.get("log_level") == LogLevel.warn
    ]


# DNS: a real server on 127.0.0.1, queried through twisted.names.client

ZONE = "svc.cluster.local"
HEADLESS = f"spegel.kube-system.{ZONE}"
ALIAS = f"spegel-alias.kube-system.{ZONE}"
V6_ONLY = f"spegel-v6.kube-system.{ZONE}"
NO_ADDRESSES = f"spegel-txt.kube-system.{ZONE}"
NO_SUCH_NAME = f"spegel-gone.kube-system.{ZONE}"

HEADLESS_V4 = ["10.244.2.9", "10.244.0.5", "10.244.1.7", "10.244.0.5"]
"""Pod IPs of the Service's endpoints in the order the server sends them, one twice."""
HEADLESS_V6 = ["fd00:10:244:0:0:0:0:7", "fd00:10:244::5"]
"""The first one spelled out in full: the bootstrapper reports the canonical form."""


class MemoryAuthority(authority.FileAuthority):
    """An authoritative zone from a dictionary: NXDOMAIN for unknown names in the
    zone, an empty answer (NODATA) for names without records of the asked type."""

    def loadFile(self, zone: tuple[Any, dict[bytes, list[Any]]]) -> None:
        self.soa, self.records = zone


def cluster_zone() -> MemoryAuthority:
    soa = dns.Record_SOA(mname=f"ns.{ZONE}", rname=f"hostmaster.{ZONE}", serial=1, ttl=5)
    records: dict[str, list[Any]] = {
        ZONE: [soa],
        HEADLESS: [dns.Record_A(a, ttl=5) for a in HEADLESS_V4]
        + [dns.Record_AAAA(a, ttl=5) for a in HEADLESS_V6]
        + [dns.Record_TXT(b"not an address", ttl=5)],
        ALIAS: [dns.Record_CNAME(HEADLESS, ttl=5)],
        V6_ONLY: [dns.Record_AAAA("fd00:10:244::9", ttl=5)],
        NO_ADDRESSES: [dns.Record_TXT(b"no pods are ready", ttl=5)],
    }
    return MemoryAuthority(((ZONE.encode(), soa), {k.encode(): v for k, v in records.items()}))


@dataclass
class DNSServer:
    address: tuple[str, int]
    zone: MemoryAuthority


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    """A real twisted.names server for ``cluster_zone()`` on 127.0.0.1, ephemeral UDP port."""
    zone = cluster_zone()
    factory = server.DNSServerFactory(authorities=[zone])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    try:
        yield DNSServer(("127.0.0.1", port.getHost().port), zone)
    finally:
        pytest_twisted.blockon(maybeDeferred(port.stopListening))


def dns_bootstrapper(dns_server: DNSServer, domain: str) -> DNSBootstrapper:
    resolver = client.Resolver(servers=[dns_server.address], reactor=reactor)
    return DNSBootstrapper(resolver, domain, ROUTER_PORT)


def test_bootstrappers_provide_the_interface() -> None:
    assert verifyObject(IBootstrapper, StaticBootstrapper(reactor, ()))
    assert verifyObject(IBootstrapper, DNSBootstrapper(object(), HEADLESS, ROUTER_PORT))


@pytest_twisted.ensureDeferred
async def test_dns_gives_every_a_and_aaaa_record_at_the_router_port(
    dns_server: DNSServer,
) -> None:
    peers = await dns_bootstrapper(dns_server, HEADLESS).peers()

    expected = {(a, ROUTER_PORT) for a in HEADLESS_V4} | {
        ("fd00:10:244::7", ROUTER_PORT),
        ("fd00:10:244::5", ROUTER_PORT),
    }
    assert set(peers) == expected
    assert len(peers) == len(expected), "each address once"
    assert peers == sorted(peers), "a stable order, whatever order the server answered in"
    for host, _ in peers:
        assert str(ipaddress.ip_address(host)) == host, "IP literals in canonical form"


@pytest_twisted.ensureDeferred
async def test_dns_is_asked_again_on_every_call(dns_server: DNSServer) -> None:
    """Pods come and go behind a headless Service: no answer is remembered."""
    bootstrapper = dns_bootstrapper(dns_server, V6_ONLY)
    assert await bootstrapper.peers() == [("fd00:10:244::9", ROUTER_PORT)]
    dns_server.zone.records[V6_ONLY.encode()] = [dns.Record_A("10.244.3.3", ttl=5)]
    assert await bootstrapper.peers() == [("10.244.3.3", ROUTER_PORT)]


@pytest_twisted.ensureDeferred
async def test_dns_follows_a_cname_to_the_addresses(dns_server: DNSServer) -> None:
    peers = await dns_bootstrapper(dns_server, ALIAS).peers()
    assert peers == await dns_bootstrapper(dns_server, HEADLESS).peers()


@pytest_twisted.ensureDeferred
async def test_dns_name_with_only_aaaa_records(dns_server: DNSServer) -> None:
    with capturedLogs() as events:
        peers = await dns_bootstrapper(dns_server, V6_ONLY).peers()
    assert peers == [("fd00:10:244::9", ROUTER_PORT)]
    assert warnings_from(events, BOOTSTRAP_NAMESPACE) == [], "an empty A answer is no problem"


@pytest.mark.parametrize(
    "domain",
    [
        pytest.param(NO_SUCH_NAME, id="nxdomain"),
        pytest.param(NO_ADDRESSES, id="nodata"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_dns_name_without_addresses_gives_no_peers_and_a_warning(
    dns_server: DNSServer, domain: str
) -> None:
    """A headless Service with no ready endpoints: NXDOMAIN from CoreDNS."""
    bootstrapper = dns_bootstrapper(dns_server, domain)
    with capturedLogs() as events:
        peers = await bootstrapper.peers()
        assert await bootstrapper.peers() == []
    assert peers == []
    [warning] = warnings_from(events, BOOTSTRAP_NAMESPACE)
    assert warning["domain"] == domain, "once, not on every retry"


# Static peers


class FakeResolvingReactor:
    """Just a ``nameResolver``: names from a dictionary, each to its addresses (an
    unknown name to none, as getaddrinfo's resolver reports a failure)."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.asked: list[str] = []
        self.nameResolver = self

    def resolveHostName(
        self,
        receiver: Any,
        host_name: str,
        port: int,
        address_types: Any,
        transport: str,
    ) -> Any:
        self.asked.append(host_name)
        assert set(address_types) == {IPv4Address, IPv6Address}, "A and AAAA both"
        receiver.resolutionBegan(None)
        for host in self.names.get(host_name, []):
            kind = IPv6Address if ":" in host else IPv4Address
            receiver.addressResolved(kind(transport, host, port))
        receiver.resolutionComplete()
        return None


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the bootstrapper answered synchronously from a synchronous resolver"
    return results[0]


def test_static_ip_literals_pass_through_in_order_unresolved() -> None:
    fake = FakeResolvingReactor({})
    configured = tuple(
        parse_address(a) for a in ["10.0.0.7:5001", "[fd00::2]:5002", "10.0.0.3:5003"]
    )
    peers = result_of(StaticBootstrapper(fake, configured).peers())
    assert peers == [("10.0.0.7", 5001), ("fd00::2", 5002), ("10.0.0.3", 5003)]
    assert fake.asked == []


@pytest_twisted.ensureDeferred
async def test_static_host_name_is_resolved_through_the_reactor() -> None:
    configured = (Address("localhost", 5001), Address("10.0.0.3", 5003))
    peers = await StaticBootstrapper(reactor, configured).peers()
    localhost = socket.getaddrinfo("localhost", 0, type=socket.SOCK_DGRAM)
    hosts = list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in localhost))
    assert "127.0.0.1" in hosts
    assert peers == [*((host, 5001) for host in hosts), ("10.0.0.3", 5003)]


def test_static_host_name_gives_every_ipv4_and_ipv6_address() -> None:
    fake = FakeResolvingReactor({"spegel-b.example": ["fd00::2", "10.0.0.2"]})
    bootstrapper = StaticBootstrapper(fake, (Address("spegel-b.example", 5001),))
    assert result_of(bootstrapper.peers()) == [("fd00::2", 5001), ("10.0.0.2", 5001)]


def test_static_unresolvable_name_is_logged_and_skipped() -> None:
    fake = FakeResolvingReactor({"spegel-b.example": ["10.0.0.2"]})
    configured = (
        Address("spegel-a.invalid", 5001),
        Address("spegel-b.example", 5001),
        Address("10.0.0.3", 5001),
    )
    with capturedLogs() as events:
        peers = result_of(StaticBootstrapper(fake, configured).peers())
    assert peers == [("10.0.0.2", 5001), ("10.0.0.3", 5001)]
    [warning] = warnings_from(events, BOOTSTRAP_NAMESPACE)
    assert warning["host"] == "spegel-a.invalid"


def test_static_host_names_are_resolved_on_every_call() -> None:
    fake = FakeResolvingReactor({"spegel-b.example": ["10.0.0.2"]})
    bootstrapper = StaticBootstrapper(fake, (Address("spegel-b.example", 5001),))
    assert result_of(bootstrapper.peers()) == [("10.0.0.2", 5001)]
    fake.names["spegel-b.example"] = ["10.0.0.9"]
    assert result_of(bootstrapper.peers()) == [("10.0.0.9", 5001)]
    assert fake.asked == ["spegel-b.example"] * 2


# The router: backoff, readiness, periodic rebootstrap, rejoining


class RecordingBootstrapper:
    """Fixed peers; remembers when it was asked and whether the router was ready then."""

    def __init__(self, clock: Clock, peers: list[tuple[str, int]]) -> None:
        self.clock = clock
        self.addresses = peers
        self.asked_at: list[float] = []
        self.ready_when_asked: list[bool] = []
        self.router: KademliaRouter | None = None

    def peers(self) -> Deferred[list[tuple[str, int]]]:
        self.asked_at.append(self.clock.seconds())
        if self.router is not None:
            self.ready_when_asked.append(self.router.ready())
        return succeed(list(self.addresses))

    def gaps(self, start: int = 0) -> list[float]:
        times = self.asked_at[start:]
        return [later - earlier for earlier, later in pairwise(times)]


def next_event(clock: Clock) -> None:
    """Jump to the next scheduled call and run it (and any due at the same time)."""
    assert clock.calls, "nothing scheduled: the router stopped trying"
    clock.advance(max(0.0, clock.calls[0].getTime() - clock.seconds()))


def run_until(clock: Clock, done: Callable[[], bool], limit: float) -> None:
    end = clock.seconds() + limit
    while not done():
        assert clock.calls and clock.calls[0].getTime() <= end, (
            f"not done within {limit} simulated seconds"
        )
        next_event(clock)


def run_for(clock: Clock, seconds: float) -> None:
    end = clock.seconds() + seconds
    while clock.calls and clock.calls[0].getTime() <= end:
        next_event(clock)
    clock.advance(end - clock.seconds())


class Net:
    """Routers on one memory network and clock; node ids from a seeded generator."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.network = MemoryUDPNetwork(self.clock)
        self._ids = random.Random(11)

    def node(
        self, host: str, seeds: list[tuple[str, int]], **router_options: Any
    ) -> tuple[KademliaRouter, RecordingBootstrapper]:
        protocol = KademliaProtocol(self.clock, self._ids.randbytes(32), registry_port=5000)
        self.network.attach(protocol, host, ROUTER_PORT)
        bootstrapper = RecordingBootstrapper(self.clock, seeds)
        router = KademliaRouter(self.clock, protocol, bootstrapper, ROUTER_PORT, **router_options)
        bootstrapper.router = router
        router.startService()
        return router, bootstrapper


def knows(router: KademliaRouter, other: KademliaRouter, host: str) -> bool:
    contact = router.protocol.table.get(other.protocol.node_id)
    return contact is not None and (contact.host, contact.port) == (host, ROUTER_PORT)


NODE = "10.0.0.1"
SEED = "10.0.0.2"
INTERVAL = 45.0


@pytest.mark.parametrize("max_delay", [5.0, 30.0])
def test_absent_peer_is_retried_with_doubling_backoff_then_joined(max_delay: float) -> None:
    net = Net()
    router, asked = net.node(
        NODE, [(SEED, ROUTER_PORT)], bootstrap_interval=INTERVAL, max_bootstrap_delay=max_delay
    )
    timeout = router.protocol.request_timeout
    attempts = 10
    run_until(net.clock, lambda: len(asked.asked_at) == attempts, limit=400)

    assert asked.asked_at[0] == 0.0, "the first attempt comes at once"
    # Each failed attempt waits out its pings, then the backoff: 0.5 s, doubling, capped.
    delays = [min(0.5 * 2**n, max_delay) for n in range(attempts - 1)]
    assert asked.gaps() == pytest.approx([timeout + d for d in delays], abs=1e-6)
    assert not router.ready()
    assert len(router.protocol.table) == 0
    assert asked.ready_when_asked == [False] * attempts

    # The seed comes up between two attempts: the very next retry joins.
    run_for(net.clock, timeout + 0.1)
    seed, _ = net.node(SEED, [(SEED, ROUTER_PORT)], bootstrap_interval=INTERVAL)
    due = asked.asked_at[-1] + timeout + max_delay
    run_until(net.clock, lambda: len(asked.asked_at) == attempts + 1, limit=max_delay + 1)
    assert asked.asked_at[-1] == pytest.approx(due, abs=1e-6)
    assert not router.ready(), "not ready until a peer is in the table"
    run_until(net.clock, router.ready, limit=timeout)
    assert knows(router, seed, SEED), "the seed is in the table under its own id"
    # The seed heard of the node from its ping, and takes it in once it answers a ping back.
    assert not knows(seed, router, NODE)
    run_until(net.clock, lambda: knows(seed, router, NODE), limit=timeout)

    # Once ready: a bootstrap every bootstrap_interval, not the backoff.
    run_until(net.clock, lambda: len(asked.asked_at) == attempts + 4, limit=4 * INTERVAL)
    assert asked.gaps(attempts) == pytest.approx([INTERVAL] * 3, abs=0.1)
    assert asked.ready_when_asked[attempts + 1 :] == [True] * 3
    assert router.ready()


def test_node_with_a_live_peer_is_ready_after_the_first_attempt() -> None:
    net = Net()
    seed, _ = net.node(SEED, [(SEED, ROUTER_PORT)], bootstrap_interval=INTERVAL)
    router, asked = net.node(NODE, [(SEED, ROUTER_PORT)], bootstrap_interval=INTERVAL)
    assert not router.ready(), "no peer before the first attempt"
    run_until(net.clock, router.ready, limit=router.protocol.request_timeout)
    assert asked.asked_at == [0.0]
    assert knows(router, seed, SEED)
    run_until(net.clock, lambda: len(asked.asked_at) == 3, limit=3 * INTERVAL)
    assert asked.gaps() == pytest.approx([INTERVAL] * 2, abs=0.1)


def test_node_whose_table_is_emptied_rejoins_at_the_next_periodic_bootstrap() -> None:
    net = Net()
    seed, _ = net.node(SEED, [(SEED, ROUTER_PORT)], bootstrap_interval=INTERVAL)
    router, asked = net.node(NODE, [(SEED, ROUTER_PORT)], bootstrap_interval=INTERVAL)
    run_until(net.clock, router.ready, limit=1)
    run_for(net.clock, 10)

    for contact in router.protocol.table.contacts():
        router.protocol.table.remove(contact.node_id)
    assert not router.ready(), "ready follows the table"
    asked_before = len(asked.asked_at)
    run_until(net.clock, router.ready, limit=INTERVAL)
    assert len(asked.asked_at) == asked_before + 1, "one periodic bootstrap rejoined"
    assert knows(router, seed, SEED)


def partition(net: Net, seed: KademliaRouter) -> Callable[[], KademliaRouter]:
    """Every datagram is lost until the returned heal() is called."""
    net.network.loss = 1.0

    def heal() -> KademliaRouter:
        net.network.loss = 0.0
        return seed

    return heal


def crash(net: Net, seed: KademliaRouter) -> Callable[[], KademliaRouter]:
    """The seed goes without a word; heal() restarts it at the same address, new id."""
    net.network.vanish(SEED, ROUTER_PORT)
    seed.stopService()

    def heal() -> KademliaRouter:
        restarted, _ = net.node(SEED, [(SEED, ROUTER_PORT)], bootstrap_interval=INTERVAL)
        return restarted

    return heal


@pytest.mark.parametrize("cut", [partition, crash], ids=["partition", "restart"])
def test_cut_off_node_notices_retries_with_fresh_backoff_and_rejoins(
    cut: Callable[[Net, KademliaRouter], Callable[[], KademliaRouter]],
) -> None:
    max_delay = 8.0
    net = Net()
    router, asked = net.node(
        NODE, [(SEED, ROUTER_PORT)], bootstrap_interval=INTERVAL, max_bootstrap_delay=max_delay
    )
    timeout = router.protocol.request_timeout
    # The node starts first and backs off up to the cap before the seed is there.
    run_until(net.clock, lambda: len(asked.asked_at) == 6, limit=60)
    assert asked.gaps()[-1] == pytest.approx(timeout + max_delay, abs=1e-6)
    seed, _ = net.node(SEED, [(SEED, ROUTER_PORT)], bootstrap_interval=INTERVAL)
    run_until(net.clock, router.ready, limit=timeout + max_delay + 1)
    run_for(net.clock, 3 * INTERVAL)
    assert router.ready()

    heal = cut(net, seed)
    cut_at = net.clock.seconds()
    # The next periodic bootstrap finds the seed silent and drops it from the table.
    run_until(net.clock, lambda: not router.ready(), limit=INTERVAL + 5)
    assert net.clock.seconds() - cut_at <= INTERVAL + 5
    assert len(router.protocol.table) == 0
    first_retry = len(asked.asked_at)
    run_until(net.clock, lambda: len(asked.asked_at) == first_retry + 5, limit=100)
    # The backoff starts over from 0.5 s, rather than staying at the periodic interval.
    assert asked.gaps(first_retry) == pytest.approx(
        [timeout + d for d in (1.0, 2.0, 4.0, 8.0)], abs=1e-6
    )
    assert asked.ready_when_asked[first_retry:] == [False] * 5

    back = heal()
    healed_at = net.clock.seconds()
    run_until(net.clock, router.ready, limit=timeout + max_delay + 1)
    assert net.clock.seconds() - healed_at <= timeout + max_delay + 0.1
    assert knows(router, back, SEED)
    run_until(net.clock, lambda: knows(back, router, NODE), limit=1)
    # And it is back on the periodic schedule.
    rejoined = len(asked.asked_at)
    run_until(net.clock, lambda: len(asked.asked_at) == rejoined + 2, limit=3 * INTERVAL)
    assert asked.gaps(rejoined - 1) == pytest.approx([INTERVAL] * 2, abs=0.1)


# Known bug, kept visible: dual-stack DNS answers on a single-stack UDP socket


class SingleStackTransport:
    """Wraps a memory transport to refuse IPv6 destinations as Twisted's IPv4 UDP port
    does (``udp.Port.write`` raises InvalidAddressError)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def write(self, packet: bytes, addr: tuple[str, int]) -> None:
        if ":" in addr[0]:
            raise InvalidAddressError(addr[0], "IPv4 port write() called with IPv6 address")
        self._inner.write(packet, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.mark.parametrize(
    ("v6_peer", "v4_seed"),
    [
        pytest.param("2001:db8::2", "30.0.0.2", id="ipv6-sorts-first-never-joins"),
        pytest.param("fd00::2", "10.0.0.2", id="ipv4-sorts-first-logs-failures"),
    ],
)
def test_ipv4_node_joins_cleanly_although_dns_also_names_ipv6_peers(
    v6_peer: str, v4_seed: str
) -> None:
    net = Net()
    seed, _ = net.node(v4_seed, [(v4_seed, ROUTER_PORT)], bootstrap_interval=INTERVAL)
    protocol = KademliaProtocol(net.clock, random.Random(5).randbytes(32), registry_port=5000)
    net.network.attach(protocol, "10.0.0.1", ROUTER_PORT)
    protocol.transport = SingleStackTransport(protocol.transport)
    # What DNSBootstrapper returns for a dual-stack Service: sorted as strings.
    peers = sorted([(v6_peer, ROUTER_PORT), (v4_seed, ROUTER_PORT)])
    bootstrapper = RecordingBootstrapper(net.clock, peers)
    router = KademliaRouter(net.clock, protocol, bootstrapper, ROUTER_PORT)
    with capturedLogs() as events:
        router.startService()
        run_for(net.clock, 10)
        router.stopService()
    failures = [e for e in events if e.get("log_level") == LogLevel.critical]
    assert router.ready() and knows(router, seed, v4_seed), "the IPv4 seed answers"
    assert failures == [], "a peer of the other address family is skipped, not a failure"


# A dual-stack socket (an empty router-addr host: listeners.py)


class DualStackShim(DatagramProtocol):
    """Stands between the memory network and a protocol as an IPv6 socket with
    IPV6_V6ONLY off does: it refuses IPv4 destinations (``udp.Port.write`` on an
    AF_INET6 port) and reports IPv4 senders as ``::ffff:a.b.c.d``, 4-tuple and all."""

    addressFamily = socket.AF_INET6

    def __init__(self, inner: DatagramProtocol) -> None:
        self.inner = inner

    def startProtocol(self) -> None:
        self.inner.makeConnection(self)

    def write(self, packet: bytes, addr: tuple[str, int]) -> None:
        if ":" not in addr[0]:
            raise InvalidAddressError(addr[0], "IPv6 port write() called with IPv4 address")
        self.transport.write(packet, (addr[0].removeprefix("::ffff:"), addr[1]))

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        mapped = f"::ffff:{addr[0]}" if ":" not in addr[0] else addr[0]
        self.inner.datagramReceived(datagram, (mapped, addr[1], 0, 0))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def test_a_dual_stack_socket_reaches_ipv4_peers_and_knows_them_as_ipv4() -> None:
    net = Net()
    seed, _ = net.node(SEED, [], bootstrap_interval=INTERVAL)
    protocol = KademliaProtocol(net.clock, random.Random(6).randbytes(32), registry_port=5000)
    net.network.attach(DualStackShim(protocol), NODE, ROUTER_PORT, bound_host="::")
    router = KademliaRouter(
        net.clock, protocol, RecordingBootstrapper(net.clock, [(SEED, ROUTER_PORT)]), ROUTER_PORT
    )
    router.startService()
    run_for(net.clock, 5)
    router.stopService()
    assert knows(router, seed, SEED), "the IPv4 seed, written to as ::ffff:10.0.0.2"
    assert knows(seed, router, NODE)
    assert protocol.counters["send_errors"] == 0
