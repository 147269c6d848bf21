"""The DHT on an in-memory UDP network with one shared task.Clock: no sockets, no sleeping.

Small clusters, one behaviour each; ``test_dht_simulation.py`` runs the issue's
200-node scenarios. Node ids and packet loss are seeded, so every run is the same.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from spegel_tx.routing.kademlia.codec import encode, split_keys
from spegel_tx.routing.kademlia.messages import (
    AddProvider,
    Binding,
    Contact,
    Header,
    Message,
    MessageType,
    Ping,
    Pong,
)
from spegel_tx.routing.kademlia.node import key_id, random_node_id
from spegel_tx.routing.kademlia.protocol import KademliaProtocol
from spegel_tx.routing.kademlia.router import KademliaRouter
from spegel_tx.testing import FixedBootstrapper, MemoryUDPNetwork, SimulatedCluster


def test_nodes_join_through_one_seed() -> None:
    cluster = SimulatedCluster(30)
    assert all(router.ready() for router in cluster.routers)
    assert min(len(r.protocol.table) for r in cluster.routers) >= 10


def test_every_node_finds_the_providers_of_every_key() -> None:
    cluster = SimulatedCluster(40)
    keys = {f"sha256:{index:064x}": index for index in range(40)}
    for key, index in keys.items():
        cluster.wait(cluster.routers[index].advertise([key]))
    rng = random.Random(7)
    for key, index in rng.sample(sorted(keys.items()), 15):
        asker = cluster.routers[(index + rng.randrange(1, 40)) % 40]
        found = cluster.providers(asker, key)
        assert found == [cluster.address(index)], key


def test_lookup_excludes_the_node_itself_and_ends_when_nobody_has_the_key() -> None:
    cluster = SimulatedCluster(10)
    cluster.wait(cluster.routers[3].advertise(["docker.io/library/a:1"]))
    assert cluster.providers(cluster.routers[3], "docker.io/library/a:1") == []
    assert cluster.providers(cluster.routers[4], "docker.io/library/nobody:1") == []


def test_withdraw_removes_the_records_at_once() -> None:
    cluster = SimulatedCluster(20)
    key = "sha256:" + "ab" * 32
    cluster.wait(cluster.routers[1].advertise([key]))
    cluster.wait(cluster.routers[2].advertise([key]))
    assert len(cluster.providers(cluster.routers[9], key)) == 2
    cluster.wait(cluster.routers[1].withdraw([key]))
    assert cluster.providers(cluster.routers[9], key) == [cluster.address(2)]


def test_records_expire_unless_republished() -> None:
    cluster = SimulatedCluster(12)
    key = "sha256:" + "cd" * 32
    cluster.wait(cluster.routers[5].advertise([key]))
    cluster.wait(cluster.routers[6].advertise([key]))
    cluster.run(20 * 60)
    found = cluster.providers(cluster.routers[8], key)
    assert sorted(found) == [cluster.address(5), cluster.address(6)], "republished every 15 min"
    cluster.vanish(6)
    cluster.run(20 * 60)
    assert cluster.providers(cluster.routers[8], key) == [cluster.address(5)], (
        "a node gone without a word: its records expire, not being republished"
    )
    cluster.routers[5].stopService()
    cluster.run(1.0)
    assert cluster.providers(cluster.routers[8], key) == [], "graceful stop withdraws"


def test_lookups_survive_packet_loss() -> None:
    cluster = SimulatedCluster(30, loss=0.1)
    key = "sha256:" + "ef" * 32
    cluster.wait(cluster.routers[7].advertise([key]))
    found = [bool(cluster.providers(router, key)) for router in cluster.routers[10:20]]
    assert sum(found) >= 9


def test_authenticated_cluster_ignores_outsiders() -> None:
    cluster = SimulatedCluster(8, secret=b"s3cret")
    outsider = KademliaProtocol(cluster.clock, random_node_id(), 5000, secret=b"other")
    cluster.network.attach(outsider, "10.9.9.9", SimulatedCluster.ROUTER_PORT)
    answer = outsider.ping(next(iter(cluster.routers[0].protocol.table.contacts())))
    failures: list[object] = []
    answer.addErrback(failures.append)
    cluster.run(2)
    assert failures, "nobody answers a datagram without the cluster's tag"
    assert sum(r.protocol.counters["dropped_auth"] for r in cluster.routers) >= 1


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=1400))
def test_arbitrary_datagrams_are_dropped_and_counted(data: bytes) -> None:
    protocol = KademliaProtocol(Clock(), random_node_id(), 5000)
    protocol.datagramReceived(data, ("10.0.0.1", 5001))
    dropped = sum(v for k, v in protocol.counters.items() if k.startswith("dropped_"))
    assert protocol.counters["datagrams_in"] == 1
    assert dropped == 1 or protocol.counters["datagrams_out"] == 1


def test_an_answer_nobody_asked_for_is_dropped() -> None:
    protocol = KademliaProtocol(Clock(), random_node_id(), 5000)
    datagram = encode(Message(Header(b"12345678", random_node_id(), 5000, 0), Pong()))
    protocol.datagramReceived(datagram, ("10.0.0.1", 5001))
    assert protocol.counters["dropped_unexpected"] == 1


def signed_ping(sender: bytes, receiver: bytes, stamp: float, source: str = "10.0.0.1") -> bytes:
    binding = Binding(receiver, source, 5001)
    header = Header(b"abcdefgh", sender, 5000, int(stamp * 1000))
    return encode(Message(header, Ping(), binding), b"k")


@pytest.mark.parametrize("age", [61.0, -61.0])
def test_stale_authenticated_datagrams_are_dropped(age: float) -> None:
    clock = Clock()
    clock.advance(1000)
    protocol = KademliaProtocol(clock, random_node_id(), 5000, secret=b"k")
    datagram = signed_ping(random_node_id(), protocol.node_id, clock.seconds() - age)
    protocol.datagramReceived(datagram, ("10.0.0.1", 5001))
    assert protocol.counters["dropped_stale"] == 1


def test_replayed_authenticated_request_is_dropped() -> None:
    clock = Clock()
    protocol = KademliaProtocol(clock, random_node_id(), 5000, secret=b"k")
    datagram = signed_ping(random_node_id(), protocol.node_id, 0)
    protocol.datagramReceived(datagram, ("10.0.0.1", 5001))
    protocol.datagramReceived(datagram, ("10.0.0.1", 5001))
    assert protocol.counters["dropped_replay"] == 1


def test_keys_advertised_before_any_peer_answered_are_placed_once_one_does() -> None:
    clock = Clock()
    network = MemoryUDPNetwork(clock)
    lonely = KademliaProtocol(clock, random_node_id(), registry_port=5000)
    network.attach(lonely, "10.0.0.1", 5001)
    router = KademliaRouter(clock, lonely, FixedBootstrapper([("10.0.0.2", 5001)]), 5001)
    router.startService()
    key = "docker.io/library/early:1"
    router.advertise([key])
    clock.advance(1)
    assert not router.ready()

    peer = KademliaProtocol(clock, random_node_id(), registry_port=5000)
    network.attach(peer, "10.0.0.2", 5001)
    for _ in range(600):  # the join is retried with backoff
        clock.advance(0.1)

    assert router.ready()
    assert peer.records.providers_of(key_id(key)) != [], "the early advertisement reached the peer"
    router.stopService()


def test_a_store_that_times_out_does_not_evict_its_node() -> None:
    clock = Clock()
    network = MemoryUDPNetwork(clock)
    protocol = KademliaProtocol(clock, random_node_id(), registry_port=5000)
    network.attach(protocol, "10.0.0.1", 5001)
    silent = Contact(random_node_id(), "10.0.0.9", 5001)
    protocol.table.seen(silent, clock.seconds())
    failures: list[object] = []

    protocol.request(silent, AddProvider((key_id("a:1"),)), evicts=False).addErrback(
        failures.append
    )
    clock.advance(protocol.request_timeout)
    assert failures and silent in protocol.table.contacts()

    protocol.ping(silent).addErrback(failures.append)
    clock.advance(protocol.request_timeout)
    assert silent not in protocol.table.contacts(), "an unanswered ping does evict"


def test_keys_of_a_lone_node_are_placed_once_a_peer_contacts_it() -> None:
    clock = Clock()
    network = MemoryUDPNetwork(clock)
    first = KademliaProtocol(clock, random_node_id(), registry_port=5000)
    network.attach(first, "10.0.0.1", 5001)
    alone = KademliaRouter(clock, first, FixedBootstrapper([]), 5001)
    alone.startService()
    key = "docker.io/library/first:1"
    alone.advertise([key])
    clock.advance(1)

    second = KademliaProtocol(clock, random_node_id(), registry_port=5000)
    network.attach(second, "10.0.0.2", 5001)
    joiner = KademliaRouter(clock, second, FixedBootstrapper([("10.0.0.1", 5001)]), 5001)
    joiner.startService()
    for _ in range(1200):  # the lone node's next periodic join
        clock.advance(0.1)

    assert second.records.providers_of(key_id(key)) != [], "the lone node's keys reached its peer"
    alone.stopService()
    joiner.stopService()


def test_every_datagram_names_its_senders_registry_as_alive() -> None:
    """The mirror forgives a peer whose router speaks (a restart re-advertises)."""
    cluster = SimulatedCluster(3)
    seen: list[tuple[str, int]] = []
    cluster.routers[0].protocol.on_peer_seen = seen.append

    cluster.wait(cluster.routers[1].advertise(["sha256:" + "cd" * 32]))

    assert cluster.address(1) in seen


def test_a_lone_node_places_its_keys_as_soon_as_its_first_peer_appears() -> None:
    clock = Clock()
    network = MemoryUDPNetwork(clock)
    first = KademliaProtocol(clock, random_node_id(), registry_port=5000)
    network.attach(first, "10.0.0.1", 5001)
    alone = KademliaRouter(clock, first, FixedBootstrapper([]), 5001)
    alone.startService()
    key = "docker.io/library/first:1"
    alone.advertise([key])
    for _ in range(600):
        clock.advance(0.1)
    # Its attempts to join came at 0, 0.5, 1.5 ... 31.5 s; the next is due at 61.5 s.
    assert clock.seconds() == pytest.approx(60.0)

    second = KademliaProtocol(clock, random_node_id(), registry_port=5000)
    network.attach(second, "10.0.0.2", 5001)
    second.ping(Contact(b"", "10.0.0.1", 5001))
    appeared = clock.seconds()
    while not second.records.providers_of(key_id(key)) and clock.seconds() < appeared + 5:
        clock.advance(0.001)
    assert second.records.providers_of(key_id(key)) != [], "the lone node's keys reached its peer"
    assert clock.seconds() - appeared < 0.1, "within a few round trips, not at its next attempt"
    alone.stopService()


def test_stores_that_fail_at_once_are_counted_lost_one_after_another() -> None:
    cluster = SimulatedCluster(3)
    advertiser = cluster.routers[0].protocol
    transport = advertiser.transport
    assert transport is not None
    write = transport.write

    def unreachable(packet: bytes, addr: tuple[str, int] | None = None) -> None:
        if packet[3] == MessageType.ADD_PROVIDER:
            raise OSError(101, "Network is unreachable")
        write(packet, addr)

    transport.write = unreachable  # type: ignore[method-assign]
    keys = [f"sha256:{n:064x}" for n in range(10_000)]
    result = cluster.wait(cluster.routers[0].advertise(keys))
    assert result is None, "hundreds of stores failing at once end the call cleanly"
    batches = 2 * len(split_keys(keys))  # both other nodes hold every key
    assert advertiser.counters["stores_lost"] == advertiser.counters["send_errors"] == batches
