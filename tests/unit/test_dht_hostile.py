"""Strangers on the DHT, on the in-memory network: forged ids, an id taken from another
address, a key crowded with made-up neighbours, floods, and signed datagrams replayed.

Each test has a stranger the test controls (``tests/support/hostile.py``) try one
attack on nodes of ``SimulatedCluster``, and checks what a user would: lookups still
name the real providers, records land on real nodes, tables keep the real node's
address, memory is bounded, the drop counters say what happened.
"""

from __future__ import annotations

import random

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

from spegel_tx.routing.kademlia.codec import decode, encode
from spegel_tx.routing.kademlia.limits import Limits
from spegel_tx.routing.kademlia.messages import (
    AddProvider,
    Binding,
    Contact,
    FindNode,
    GetProviders,
    Header,
    Message,
    Nodes,
    Ping,
)
from spegel_tx.routing.kademlia.node import key_id, random_node_id
from spegel_tx.routing.kademlia.protocol import (
    KademliaProtocol,
    RequestTimeout,
    RequestUnsendable,
)
from spegel_tx.routing.kademlia.router import KademliaRouter
from spegel_tx.testing import FixedBootstrapper, MemoryUDPNetwork, SimulatedCluster, simulated_host
from tests.support.hostile import Stranger, StrangerProtocol, ids_near, request

PORT = SimulatedCluster.ROUTER_PORT
STRANGER = "10.6.6.6"


def join_stranger(cluster: SimulatedCluster, stranger: Stranger) -> StrangerProtocol:
    stranger.router_port = PORT
    hostile = StrangerProtocol(stranger, STRANGER)
    cluster.network.attach(hostile, STRANGER, PORT)
    return hostile


def at_stranger(router: KademliaRouter) -> list[Contact]:
    return [c for c in router.protocol.table.contacts() if c.host == STRANGER]


def dropped(router: KademliaRouter, reason: str) -> int:
    return router.protocol.counters[f"dropped_{reason}"]


def run(clock: Clock, seconds: float, step: float = 0.001) -> None:
    """Advance in steps: a datagram sent during a step arrives a step later."""
    for _ in range(round(seconds / step)):
        clock.advance(step)


# Who enters the routing table


def test_a_sender_enters_the_table_only_by_answering_from_its_address() -> None:
    clock = Clock()
    network = MemoryUDPNetwork(clock)
    node = KademliaProtocol(clock, random_node_id(), 5000)
    network.attach(node, "10.0.0.1", PORT)
    # A request whose source is an address where nobody answers (forged, or gone).
    claimed = random_node_id()
    node.datagramReceived(request(Ping(), claimed), ("10.0.0.66", PORT))
    run(clock, node.request_timeout)
    assert node.table.get(claimed) is None
    assert node.counters["timeouts"] == 1, "it was pinged back, and did not answer"

    peer = KademliaProtocol(clock, random_node_id(), 5000)
    network.attach(peer, "10.0.0.2", PORT)
    peer.ping(Contact(b"", "10.0.0.1", PORT))
    run(clock, 0.0015)
    assert node.table.get(peer.node_id) is None, "heard of, not yet checked"
    run(clock, 0.01)
    assert node.table.get(peer.node_id) == Contact(peer.node_id, "10.0.0.2", PORT)


def test_a_live_nodes_id_cannot_be_taken_over_from_another_address() -> None:
    cluster = SimulatedCluster(6)
    owner = cluster.routers[0]
    key = "docker.io/library/owned:1"
    cluster.wait(owner.advertise([key]))
    stranger = Stranger([owner.protocol.node_id])
    hostile = join_stranger(cluster, stranger)
    for index in range(1, 6):
        for body in (Ping(), FindNode(random_node_id()), AddProvider((key_id(key),))):
            hostile.send(request(body, owner.protocol.node_id), (simulated_host(index), PORT))
    cluster.run(60)
    real = Contact(owner.protocol.node_id, simulated_host(0), PORT)
    for router in cluster.routers[1:]:
        assert router.protocol.table.get(owner.protocol.node_id) == real
        assert dropped(router, "id_conflict") >= 1
        assert at_stranger(router) == []
    for router in cluster.routers[1:]:
        assert cluster.address(0) in cluster.providers(router, key)


def test_a_node_back_at_a_new_address_under_its_id_takes_its_slot_once_the_old_is_silent() -> None:
    cluster = SimulatedCluster(4)
    moving = cluster.routers[3].protocol.node_id
    cluster.vanish(3)
    # The same node id comes back at another address (a pod rescheduled, its data-dir kept).
    back = KademliaProtocol(cluster.clock, moving, 5000)
    cluster.network.attach(back, "10.0.9.9", PORT)
    seeds = FixedBootstrapper([(simulated_host(0), PORT)])
    router = KademliaRouter(cluster.clock, back, seeds, PORT)
    router.startService()
    cluster.run(120)
    held = {r.protocol.table.get(moving) for r in cluster.routers[:3]}
    assert held == {Contact(moving, "10.0.9.9", PORT)}, "once silent, the slot is the new one's"
    router.stopService()


def test_one_address_gets_two_slots_however_many_ids_it_forges() -> None:
    cluster = SimulatedCluster(10)
    stranger = Stranger(ids_near(random_node_id(), 60))
    hostile = join_stranger(cluster, stranger)
    for index in range(10):
        for datagram in stranger.claims(Ping()):
            hostile.send(datagram, (simulated_host(index), PORT))
            cluster.run(0.005)
    for router in cluster.routers:
        assert len(at_stranger(router)) <= Limits().contacts_per_host
        assert dropped(router, "host_full") > 0


@pytest.mark.parametrize(
    "named_hosts",
    [(), tuple(f"10.7.0.{n}" for n in range(1, 21))],
    ids=["named-at-its-address", "named-at-silent-addresses"],
)
def test_forged_ids_near_a_key_neither_hide_it_nor_take_its_records(
    named_hosts: tuple[str, ...],
) -> None:
    cluster = SimulatedCluster(30)
    key = "docker.io/library/crowded:1"
    target = key_id(key)
    # 120 ids nearer the key than any node, in every table first, then in every answer.
    stranger = Stranger(ids_near(target, 120), named_hosts=named_hosts)
    hostile = join_stranger(cluster, stranger)
    for index in range(30):
        for datagram in stranger.claims(FindNode(target)):
            hostile.send(datagram, (simulated_host(index), PORT))
        cluster.run(1)
    publisher = 9
    cluster.wait(cluster.routers[publisher].advertise([key]))
    holders = [r for r in cluster.routers if r.protocol.records.providers_of(target)]
    assert len(holders) >= 15, "the records went to real nodes"
    askers = [(r, key) for index, r in enumerate(cluster.routers) if index != publisher]
    assert cluster.lookups(askers) == [[cluster.address(publisher)]] * 29
    assert len(stranger.keys_offered) <= 1


# Records


def test_an_add_provider_flood_from_one_address_stays_within_its_share() -> None:
    clock = Clock()
    network = MemoryUDPNetwork(clock)
    limits = Limits(records=3000, records_per_host=1000)
    node = KademliaProtocol(clock, random_node_id(), 5000, limits=limits)
    network.attach(node, "10.0.0.1", PORT)
    legit = key_id("docker.io/library/legit:1")
    node.datagramReceived(request(AddProvider((legit,)), random_node_id()), ("10.0.0.2", PORT))
    rng = random.Random(3)
    for _ in range(3000):  # a new sender id and 34 new keys every time
        keys = tuple(rng.randbytes(32) for _ in range(34))
        node.datagramReceived(request(AddProvider(keys), random_node_id()), (STRANGER, PORT))
    assert len(node.records) == 1001
    assert node.records.sources() == 2
    # The same keys under a new id each time: one record per key and address.
    same = tuple(rng.randbytes(32) for _ in range(34))
    for _ in range(500):
        node.datagramReceived(request(AddProvider(same), random_node_id()), ("10.0.0.3", PORT))
    assert len(node.records) == 1035
    assert [p.host for p in node.records.providers_of(legit)] == ["10.0.0.2"]
    # Strangers on many addresses fill the store; the largest gives way, the legit one stays.
    for n in range(400):
        keys = tuple(rng.randbytes(32) for _ in range(34))
        node.datagramReceived(request(AddProvider(keys), random_node_id()), (f"10.8.{n}.1", PORT))
    assert len(node.records) == 3000
    assert [p.host for p in node.records.providers_of(legit)] == ["10.0.0.2"]
    assert node.counters["records_evicted"] > 0


# Answers


def test_answers_to_one_address_cost_no_more_than_its_requests_and_a_small_allowance() -> None:
    cluster = SimulatedCluster(30)
    stranger = Stranger([random_node_id()])
    hostile = join_stranger(cluster, stranger)
    victim = cluster.routers[0].protocol
    limits = victim.limits
    sent = 0
    start = cluster.clock.seconds()
    for _ in range(2000):
        for body in (FindNode(random_node_id()), GetProviders(random_node_id())):
            datagram = request(body, stranger.ids[0])
            sent += len(datagram)
            hostile.send(datagram, (simulated_host(0), PORT))
        cluster.run(0.0005)
    cluster.run(0.1)
    elapsed = cluster.clock.seconds() - start
    allowance = limits.answer_burst + limits.answer_rate * elapsed
    assert stranger.received["Nodes"] + stranger.received["Providers"] == 4000
    assert stranger.bytes_in - sent <= allowance
    assert sent > 0 and stranger.bytes_in / sent < 1.6, "not a 9.7x amplifier"
    assert victim.counters["answers_trimmed"] > 3000


def test_an_answer_cut_to_the_size_of_its_request_still_decodes() -> None:
    clock = Clock()
    network = MemoryUDPNetwork(clock)
    limits = Limits(answer_burst=0, answer_rate=0)
    node = KademliaProtocol(clock, random_node_id(), 5000, limits=limits)
    network.attach(node, "10.0.0.1", PORT)
    for n in range(20):
        node.table.seen(Contact(random_node_id(), f"10.0.1.{n}", PORT), 0.0)
    answers: list[bytes] = []
    hostile = StrangerProtocol(Stranger([random_node_id()]), STRANGER)
    hostile.datagramReceived = lambda data, addr: answers.append(data)  # type: ignore[method-assign]
    network.attach(hostile, STRANGER, PORT)
    datagram = request(FindNode(random_node_id()), random_node_id())
    hostile.send(datagram, ("10.0.0.1", PORT))
    run(clock, 0.01)
    (answer,) = [decoded for decoded in map(decode, answers) if isinstance(decoded.body, Nodes)]
    assert len(encode(answer)) <= len(datagram)
    assert answer.body == Nodes(())
    assert node.counters["answers_trimmed"] == 1


# Signed mode: a datagram is for one receiver, from one address


Carried = tuple[tuple[str, int], bytes, tuple[str, int]]
"""A datagram on the network: source, bytes, destination."""


def signed_traffic(cluster: SimulatedCluster) -> list[Carried]:
    """Record every datagram the network carries from now on, as a stranger on the path would."""
    seen: list[Carried] = []
    send = cluster.network.send

    def recording(source: tuple[str, int], data: bytes, destination: tuple[str, int]) -> None:
        seen.append((source, data, destination))
        send(source, data, destination)

    cluster.network.send = recording  # type: ignore[method-assign]
    return seen


SECRET = b"cluster secret 0123456789"


def test_a_signed_datagram_replayed_to_another_node_or_from_another_address_is_dropped() -> None:
    cluster = SimulatedCluster(4, secret=SECRET)
    traffic = signed_traffic(cluster)
    a, b, c = (cluster.routers[i] for i in range(3))
    key = "docker.io/library/signed:1"
    cluster.wait(a.advertise([key]))
    a_to_b = [
        data
        for source, data, destination in traffic
        if source == (simulated_host(0), PORT)
        and destination == (simulated_host(1), PORT)
        and isinstance(decode(data, SECRET).body, AddProvider)
    ]
    assert a_to_b, "A placed its record on B"
    hostile = join_stranger(cluster, Stranger([random_node_id()]))
    before = {r: len(r.protocol.records) for r in (b, c)}
    for data in a_to_b:
        hostile.send(data, (simulated_host(2), PORT))  # to C, from the stranger
        hostile.send(data, (simulated_host(1), PORT))  # to B, from the stranger
        # To C as if from A's own address (a stranger who can forge its source).
        c.protocol.datagramReceived(data, (simulated_host(0), PORT))
    cluster.run(1)
    assert dropped(c, "wrong_receiver") == 2 * len(a_to_b)
    assert dropped(b, "wrong_source") == len(a_to_b)
    assert {r: len(r.protocol.records) for r in (b, c)} == before
    for router in (b, c):
        assert at_stranger(router) == []
        assert all(p.host != STRANGER for p in router.protocol.records.providers_of(key_id(key)))


def test_a_signed_ping_relayed_through_a_stranger_admits_nobody_at_its_address() -> None:
    cluster = SimulatedCluster(3, secret=SECRET)
    a, c = cluster.routers[0], cluster.routers[2]
    relay = StrangerProtocol(Stranger([random_node_id()]), STRANGER)
    # The stranger passes C's datagrams on to A, and A's back to C, from its own address.
    forward = {(simulated_host(2), PORT): (simulated_host(0), PORT)}
    forward[(simulated_host(0), PORT)] = (simulated_host(2), PORT)
    relay.datagramReceived = lambda data, addr: relay.send(data, forward[addr])  # type: ignore[method-assign]
    cluster.network.attach(relay, STRANGER, PORT)
    pinged = c.protocol.ping(Contact(a.protocol.node_id, STRANGER, PORT))
    failures: list[Failure] = []
    pinged.addErrback(failures.append)
    cluster.run(2)
    assert dropped(a, "wrong_source") == 1, "A refuses C's ping coming from the stranger"
    assert [failure.type for failure in failures] == [RequestTimeout], "so nobody answers it"
    assert c.protocol.table.get(a.protocol.node_id) == Contact(
        a.protocol.node_id, simulated_host(0), PORT
    )


def test_an_exact_replay_to_the_same_node_from_the_same_address_is_dropped() -> None:
    cluster = SimulatedCluster(3, secret=SECRET)
    traffic = signed_traffic(cluster)
    a, b = cluster.routers[0], cluster.routers[1]
    a.protocol.ping(Contact(b.protocol.node_id, simulated_host(1), PORT))
    cluster.run(1)
    (data,) = [data for source, data, _ in traffic if source == (simulated_host(0), PORT)]
    b.protocol.datagramReceived(data, (simulated_host(0), PORT))
    assert dropped(b, "replay") == 1


def test_only_a_ping_may_go_to_whoever_listens() -> None:
    clock = Clock()
    node = KademliaProtocol(clock, random_node_id(), 5000, secret=SECRET)
    MemoryUDPNetwork(clock).attach(node, "10.0.0.1", PORT)
    anyone = Binding(bytes(32), "10.0.0.2", PORT)
    for body in (Ping(), FindNode(random_node_id())):
        header = Header(random.randbytes(8), random_node_id(), 5000, 0)
        node.datagramReceived(encode(Message(header, body, anyone), SECRET), ("10.0.0.2", PORT))
    assert node.counters["dropped_wrong_receiver"] == 1
    assert node.counters["datagrams_out"] == 2, "a pong, and a ping to check the sender"


# The node itself


def test_a_request_without_a_socket_fails_at_once() -> None:
    protocol = KademliaProtocol(Clock(), random_node_id(), 5000)
    failures: list[object] = []
    protocol.ping(Contact(random_node_id(), "10.0.0.2", PORT)).addErrback(failures.append)
    assert failures and failures[0].check(RequestUnsendable)  # type: ignore[attr-defined]


@pytest.mark.parametrize("secret", [None, SECRET])
def test_a_node_without_a_secret_says_so_once_at_start(secret: bytes | None) -> None:
    clock = Clock()
    protocol = KademliaProtocol(clock, random_node_id(), 5000, secret=secret)
    MemoryUDPNetwork(clock).attach(protocol, "10.0.0.1", PORT)
    router = KademliaRouter(clock, protocol, FixedBootstrapper([]), PORT)
    with capturedLogs() as events:
        router.startService()
        clock.advance(120)
        router.stopService()
    warnings = [e for e in events if "cluster secret" in e.get("log_format", "")]
    assert len(warnings) == (1 if secret is None else 0)
    if warnings:
        assert warnings[0]["log_level"] == LogLevel.warn
        assert "anyone" in warnings[0]["log_format"]
