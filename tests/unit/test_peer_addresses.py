"""A peer with several addresses (a dual-stack pod): the DHT learns each address a node
answers from, and the mirror's connections race them, IPv6 first, the first to
connect winning."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface.verify import verifyObject

from spegel_tx.registry.connections import ATTEMPT_DELAY, PeerClient, RacingEndpoint, peer_agent
from spegel_tx.routing.addresses import NodeAddresses
from spegel_tx.routing.kademlia.messages import Contact
from spegel_tx.routing.kademlia.protocol import KademliaProtocol
from spegel_tx.testing import MemoryUDPNetwork

A, B = b"\x0a" * 32, b"\x0b" * 32

# What the DHT learns


def test_a_node_is_known_at_every_address_it_answered_from_ipv6_first() -> None:
    book = NodeAddresses()
    book.learn(A, "10.0.0.2")
    book.learn(A, "fd00::2")
    assert book.hosts_of("10.0.0.2") == ["fd00::2", "10.0.0.2"]
    assert book.hosts_of("fd00::2") == ["fd00::2", "10.0.0.2"]
    assert book.hosts_of("10.0.0.9") == ["10.0.0.9"], "an unknown peer: its own address"


def test_an_address_taken_over_by_another_node_leaves_the_first() -> None:
    book = NodeAddresses()
    book.learn(A, "10.0.0.2")
    book.learn(A, "fd00::2")
    book.learn(B, "10.0.0.2")
    assert book.hosts_of("10.0.0.2") == ["10.0.0.2"]
    assert book.hosts_of("fd00::2") == ["fd00::2"]


def test_the_book_is_bounded() -> None:
    book = NodeAddresses(max_nodes=2)
    for n in range(3):
        book.learn(bytes([n]) * 32, f"10.0.0.{n}")
        book.learn(bytes([n]) * 32, f"fd00::{n}")
    assert book.hosts_of("10.0.0.0") == ["10.0.0.0"], "the least recent node is forgotten"
    assert book.hosts_of("10.0.0.2") == ["fd00::2", "10.0.0.2"]
    for n in range(10):
        book.learn(A, f"fd00::a:{n}")
    assert len(book.hosts_of("fd00::a:9")) == 4


def settle(clock: Clock) -> None:
    """Let datagrams and their answers arrive (a millisecond each way)."""
    for _ in range(10):
        clock.advance(0.001)


def test_the_dht_learns_a_second_address_only_from_an_answer() -> None:
    """One node (one id) on an IPv4 and an IPv6 socket, as a dual-stack pod is to a
    peer that pings both addresses the headless Service names."""
    clock = Clock()
    network = MemoryUDPNetwork(clock)
    asker = KademliaProtocol(clock, B, registry_port=5000)
    network.attach(asker, "10.0.0.1", 5001)
    for host in ("10.0.0.2", "fd00::2"):
        network.attach(KademliaProtocol(clock, A, registry_port=5000), host, 5001)
    asker.ping(Contact(b"", "10.0.0.2", 5001))
    settle(clock)
    assert asker.addresses.hosts_of("10.0.0.2") == ["10.0.0.2"]
    # A datagram claiming the id from elsewhere teaches nothing: only an answer does.
    stranger = KademliaProtocol(clock, A, registry_port=5000)
    network.attach(stranger, "fd00::66", 5001)
    stranger.ping(Contact(b"", "10.0.0.1", 5001))
    settle(clock)
    assert asker.addresses.hosts_of("10.0.0.2") == ["10.0.0.2"]
    asker.ping(Contact(b"", "fd00::2", 5001))
    settle(clock)
    assert asker.addresses.hosts_of("10.0.0.2") == ["fd00::2", "10.0.0.2"]


# How the mirror's connections use it


class FakeEndpoint:
    """Connects when told to (``answer``), or fails at once (``refuse``)."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.attempts: list[Deferred[Any]] = []
        self.cancelled = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.refuse:
            return fail(ConnectionRefusedError())

        def cancelled(_: Any) -> None:
            self.cancelled += 1

        attempt: Deferred[Any] = Deferred(cancelled)
        attempt.factory = factory  # type: ignore[attr-defined]
        self.attempts.append(attempt)
        return attempt

    def answer(self) -> Protocol:
        attempt = self.attempts[-1]
        protocol = attempt.factory.buildProtocol(None)  # type: ignore[attr-defined]
        protocol.makeConnection(StringTransport())
        attempt.callback(protocol)
        return protocol


def race(*endpoints: FakeEndpoint) -> tuple[Clock, list[Any]]:
    clock = Clock()
    results: list[Any] = []
    racing = RacingEndpoint(clock, endpoints)
    racing.connect(Factory.forProtocol(Protocol)).addBoth(results.append)
    return clock, results


def test_the_next_address_is_tried_after_the_attempt_delay_and_the_first_to_connect_wins() -> None:
    v6, v4 = FakeEndpoint(), FakeEndpoint()
    clock, results = race(v6, v4)
    assert (len(v6.attempts), len(v4.attempts)) == (1, 0)
    clock.advance(ATTEMPT_DELAY - 0.001)
    assert len(v4.attempts) == 0
    clock.advance(0.001)
    assert len(v4.attempts) == 1, "the IPv6 attempt hangs: IPv4 is tried beside it"
    protocol = v4.answer()
    assert results == [protocol]
    assert v6.cancelled == 1, "the attempt still under way is cancelled"
    assert not clock.getDelayedCalls()


def test_a_refused_address_hands_over_at_once() -> None:
    v6, v4 = FakeEndpoint(refuse=True), FakeEndpoint()
    clock, results = race(v6, v4)
    assert len(v4.attempts) == 1 and clock.seconds() == 0
    assert results == [v4.answer()]


def test_the_race_fails_with_the_last_failure_when_every_address_fails() -> None:
    v6, v4 = FakeEndpoint(), FakeEndpoint(refuse=True)
    clock, results = race(v6, v4)
    clock.advance(ATTEMPT_DELAY)
    assert results == [], "the IPv6 attempt may still connect"
    v6.attempts[0].errback(ConnectionRefusedError())
    [failure] = results
    assert failure.check(ConnectionRefusedError)


def test_cancelling_the_race_cancels_every_attempt() -> None:
    v6, v4 = FakeEndpoint(), FakeEndpoint()
    clock = Clock()
    results: list[Any] = []
    racing = RacingEndpoint(clock, [v6, v4])
    connecting = racing.connect(Factory.forProtocol(Protocol))
    connecting.addBoth(results.append)
    clock.advance(ATTEMPT_DELAY)
    connecting.cancel()
    assert (v6.cancelled, v4.cancelled) == (1, 1)
    assert results[0].check(CancelledError)
    assert not clock.getDelayedCalls()


def test_the_race_is_an_endpoint() -> None:
    assert verifyObject(IStreamClientEndpoint, RacingEndpoint(Clock(), []))


def test_the_peer_agent_races_every_address_of_the_peer() -> None:
    reactor = MemoryReactorClock()
    book = NodeAddresses()
    book.learn(A, "10.0.0.2")
    book.learn(A, "fd00::2")
    agent = peer_agent(reactor, 1.5, 8, book.hosts_of)
    agent.request(b"GET", b"http://10.0.0.2:5000/v2/")
    assert [client[0] for client in reactor.tcpClients] == ["fd00::2"]
    reactor.advance(ATTEMPT_DELAY)
    assert [(c[0], c[1], c[3]) for c in reactor.tcpClients] == [
        ("fd00::2", 5000, 1.5),
        ("10.0.0.2", 5000, 1.5),
    ]


@pytest.mark.parametrize("host", ["10.0.0.3", "fd00::3"])
def test_a_peer_known_at_one_address_is_connected_to_directly(host: str) -> None:
    reactor = MemoryReactorClock()
    agent = peer_agent(reactor, 1.5, 8, NodeAddresses().hosts_of)
    url = f"http://[{host}]:5000/v2/" if ":" in host else f"http://{host}:5000/v2/"
    agent.request(b"GET", url.encode())
    reactor.advance(ATTEMPT_DELAY)
    assert [client[0] for client in reactor.tcpClients] == [host]


def test_an_address_that_connects_at_once_ends_the_race() -> None:

    class Connected:
        def connect(self, factory: Any) -> Deferred[Any]:
            return succeed(factory.buildProtocol(None))

    second = FakeEndpoint()
    clock, results = race(Connected(), second)  # type: ignore[arg-type]
    assert len(results) == 1 and not second.attempts and not clock.getDelayedCalls()


def test_treq_requests_reach_an_ipv6_peer() -> None:
    """treq's own client IDNA-encodes every host, and idna refuses an IPv6 literal's
    colons: the request would fail before connecting."""
    reactor = MemoryReactorClock()
    client = PeerClient(peer_agent(reactor, 1.5, 8))
    client.request("GET", "http://[fd00::2]:5000/v2/library/demo/blobs/sha256:ab?ns=a%3A1")
    assert [client[0] for client in reactor.tcpClients] == ["fd00::2"]
