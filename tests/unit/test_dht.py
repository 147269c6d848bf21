"""The DHT on an in-memory UDP network with one shared task.Clock: no sockets, no sleeping."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from spegel_tx.routing.kademlia.codec import encode
from spegel_tx.routing.kademlia.messages import Header, Message, Ping
from spegel_tx.routing.kademlia.node import random_node_id
from spegel_tx.routing.kademlia.protocol import KademliaProtocol
from spegel_tx.routing.kademlia.router import KademliaRouter
from spegel_tx.testing import MemoryUDPNetwork

ROUTER_PORT = 5001


@dataclass
class StaticPeers:
    peers_list: list[tuple[str, int]]

    def peers(self):
        d: Deferred = Deferred()
        d.callback(list(self.peers_list))
        return d


def host_of(index: int) -> str:
    return f"10.{index // 65536}.{index // 256 % 256}.{index % 256 + 1}"


class Cluster:
    """``size`` routers on one memory network, each bootstrapping from node 0."""

    def __init__(self, size: int, loss: float = 0.0, seed: int = 1, secret: bytes | None = None):
        self.clock = Clock()
        self.network = MemoryUDPNetwork(self.clock, loss=loss, seed=seed)
        self.routers: list[KademliaRouter] = []
        seeds = StaticPeers([(host_of(0), ROUTER_PORT)])
        for index in range(size):
            protocol = KademliaProtocol(
                self.clock, random_node_id(), registry_port=5000 + index % 3, secret=secret
            )
            self.network.attach(protocol, host_of(index), ROUTER_PORT)
            router = KademliaRouter(self.clock, protocol, seeds, ROUTER_PORT)
            self.routers.append(router)
        for router in self.routers:
            router.startService()
        self.run(30)

    def run(self, seconds: float, step: float = 0.01) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)

    def wait(self, d: Deferred, limit: float = 60.0):
        results: list = []
        d.addBoth(results.append)
        waited = 0.0
        while not results and waited < limit:
            self.clock.advance(0.01)
            waited += 0.01
        assert results, "did not finish in simulated time"
        return results[0]

    def providers(self, router: KademliaRouter, key: str, count: int = 5) -> list[tuple[str, int]]:
        lookup = router.lookup(key, count)
        found = []
        while True:
            provider = self.wait(lookup.next_provider())
            if provider is None:
                return found
            found.append(provider)


def test_nodes_join_through_one_seed():
    cluster = Cluster(30)
    assert all(router.ready() for router in cluster.routers)
    assert min(len(r.protocol.table) for r in cluster.routers) >= 10


def test_every_node_finds_the_providers_of_every_key():
    cluster = Cluster(40)
    keys = {f"sha256:{index:064x}": index for index in range(40)}
    for key, index in keys.items():
        cluster.wait(cluster.routers[index].advertise([key]))
    rng = random.Random(7)
    for key, index in rng.sample(sorted(keys.items()), 15):
        asker = cluster.routers[(index + rng.randrange(1, 40)) % 40]
        found = cluster.providers(asker, key)
        assert found == [(host_of(index), 5000 + index % 3)], key


def test_lookup_excludes_the_node_itself_and_ends_when_nobody_has_the_key():
    cluster = Cluster(10)
    cluster.wait(cluster.routers[3].advertise(["docker.io/library/a:1"]))
    assert cluster.providers(cluster.routers[3], "docker.io/library/a:1") == []
    assert cluster.providers(cluster.routers[4], "docker.io/library/nobody:1") == []


def test_withdraw_removes_the_records_at_once():
    cluster = Cluster(20)
    key = "sha256:" + "ab" * 32
    cluster.wait(cluster.routers[1].advertise([key]))
    cluster.wait(cluster.routers[2].advertise([key]))
    assert len(cluster.providers(cluster.routers[9], key)) == 2
    cluster.wait(cluster.routers[1].withdraw([key]))
    assert cluster.providers(cluster.routers[9], key) == [(host_of(2), 5002)]


def test_records_expire_unless_republished():
    cluster = Cluster(12)
    key = "sha256:" + "cd" * 32
    cluster.wait(cluster.routers[5].advertise([key]))
    cluster.run(20 * 60, step=0.1)
    assert cluster.providers(cluster.routers[8], key) != [], "republished every 15 minutes"
    cluster.routers[5].stopService()
    cluster.run(1.0)
    assert cluster.providers(cluster.routers[8], key) == [], "graceful stop withdraws"


def test_lookups_survive_packet_loss():
    cluster = Cluster(30, loss=0.1)
    key = "sha256:" + "ef" * 32
    cluster.wait(cluster.routers[7].advertise([key]))
    found = [bool(cluster.providers(router, key)) for router in cluster.routers[10:20]]
    assert sum(found) >= 9


def test_authenticated_cluster_ignores_outsiders():
    cluster = Cluster(8, secret=b"s3cret")
    outsider = KademliaProtocol(cluster.clock, random_node_id(), 5000, secret=b"other")
    cluster.network.attach(outsider, "10.9.9.9", ROUTER_PORT)
    answer = outsider.ping(next(iter(cluster.routers[0].protocol.table.contacts())))
    failures: list = []
    answer.addErrback(failures.append)
    cluster.run(2)
    assert failures, "nobody answers a datagram without the cluster's tag"
    assert sum(r.protocol.counters["dropped_auth"] for r in cluster.routers) >= 1


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=1400))
def test_arbitrary_datagrams_are_dropped_and_counted(data):
    protocol = KademliaProtocol(Clock(), random_node_id(), 5000)
    protocol.datagramReceived(data, ("10.0.0.1", 5001))
    dropped = sum(v for k, v in protocol.counters.items() if k.startswith("dropped_"))
    assert protocol.counters["datagrams_in"] == 1
    assert dropped == 1 or protocol.counters["datagrams_out"] == 1


def test_an_answer_nobody_asked_for_is_dropped():
    protocol = KademliaProtocol(Clock(), random_node_id(), 5000)
    from spegel_tx.routing.kademlia.messages import Pong

    datagram = encode(Message(Header(b"12345678", random_node_id(), 5000, 0), Pong()))
    protocol.datagramReceived(datagram, ("10.0.0.1", 5001))
    assert protocol.counters["dropped_unexpected"] == 1


@pytest.mark.parametrize("age", [61.0, -61.0])
def test_stale_authenticated_datagrams_are_dropped(age):
    clock = Clock()
    clock.advance(1000)
    protocol = KademliaProtocol(clock, random_node_id(), 5000, secret=b"k")
    stamp = int((clock.seconds() - age) * 1000)
    datagram = encode(Message(Header(b"abcdefgh", random_node_id(), 5000, stamp), Ping()), b"k")
    protocol.datagramReceived(datagram, ("10.0.0.1", 5001))
    assert protocol.counters["dropped_stale"] == 1


def test_replayed_authenticated_request_is_dropped():
    clock = Clock()
    protocol = KademliaProtocol(clock, random_node_id(), 5000, secret=b"k")
    datagram = encode(Message(Header(b"abcdefgh", random_node_id(), 5000, 0), Ping()), b"k")
    protocol.datagramReceived(datagram, ("10.0.0.1", 5001))
    protocol.datagramReceived(datagram, ("10.0.0.1", 5001))
    assert protocol.counters["dropped_replay"] == 1
