"""One suite for every IRouter: the in-memory one and the Kademlia DHT on a memory UDP network."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from spegel_tx.interfaces import ILookup, IRouter
from spegel_tx.routing.kademlia.node import random_node_id
from spegel_tx.routing.kademlia.protocol import KademliaProtocol
from spegel_tx.routing.kademlia.router import KademliaRouter
from spegel_tx.routing.memory import MemoryRoutingTable
from spegel_tx.testing import MemoryUDPNetwork


@dataclass
class Routers:
    """Three routers that can see each other, and how to let time pass."""

    routers: list[IRouter]
    addresses: list[tuple[str, int]]
    settle: Callable[[Deferred], object]


class Seeds:
    def __init__(self, peers: list[tuple[str, int]]) -> None:
        self._peers = peers

    def peers(self) -> Deferred[list[tuple[str, int]]]:
        return succeed(self._peers)


def memory_routers() -> Routers:
    table = MemoryRoutingTable()
    addresses = [(f"10.0.0.{n}", 5000) for n in (1, 2, 3)]
    routers: list[IRouter] = [table.router(*address) for address in addresses]

    def settle(d: Deferred) -> object:
        results: list = []
        d.addBoth(results.append)
        return results[0]

    return Routers(routers, addresses, settle)


def kademlia_routers() -> Routers:
    clock = Clock()
    network = MemoryUDPNetwork(clock)
    addresses = [(f"10.0.0.{n}", 5000) for n in (1, 2, 3)]
    routers: list[IRouter] = []
    for host, port in addresses:
        protocol = KademliaProtocol(clock, random_node_id(), registry_port=port)
        network.attach(protocol, host, 5001)
        router = KademliaRouter(clock, protocol, Seeds([("10.0.0.1", 5001)]), 5001)
        router.startService()
        routers.append(router)

    def settle(d: Deferred) -> object:
        results: list = []
        d.addBoth(results.append)
        for _ in range(3000):
            if results:
                break
            clock.advance(0.01)
        return results[0]

    settle(Deferred.fromCoroutine(_pause(clock, 5.0)))
    return Routers(routers, addresses, settle)


async def _pause(clock: Clock, seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(clock, seconds)


@pytest.fixture(params=[memory_routers, kademlia_routers], ids=["memory", "kademlia"])
def cluster(request) -> Routers:
    return request.param()


def found(cluster: Routers, router: IRouter, key: str, count: int = 10) -> list[tuple[str, int]]:
    lookup = router.lookup(key, count)
    assert verifyObject(ILookup, lookup)
    providers = []
    while (provider := cluster.settle(lookup.next_provider())) is not None:
        providers.append(provider)
    return providers


def test_provides_the_interface_and_is_ready_with_peers(cluster):
    for router in cluster.routers:
        assert verifyObject(IRouter, router)
        assert router.ready()


def test_advertised_keys_are_found_by_others_but_not_by_oneself(cluster):
    first, second, third = cluster.routers
    key = "docker.io/library/nginx:1.27"
    cluster.settle(first.advertise([key, "sha256:" + "1" * 64]))
    cluster.settle(second.advertise([key]))
    assert sorted(found(cluster, third, key)) == sorted(cluster.addresses[:2])
    assert found(cluster, first, key) == [cluster.addresses[1]]
    assert found(cluster, third, "sha256:" + "1" * 64) == [cluster.addresses[0]]


def test_count_limits_the_providers_given(cluster):
    key = "sha256:" + "2" * 64
    for router in cluster.routers[:2]:
        cluster.settle(router.advertise([key]))
    assert len(found(cluster, cluster.routers[2], key, count=1)) == 1


def test_withdrawn_keys_are_no_longer_found(cluster):
    key = "sha256:" + "3" * 64
    cluster.settle(cluster.routers[0].advertise([key]))
    cluster.settle(cluster.routers[0].withdraw([key]))
    assert found(cluster, cluster.routers[1], key) == []


def test_cancelled_lookup_gives_no_more(cluster):
    key = "sha256:" + "4" * 64
    cluster.settle(cluster.routers[0].advertise([key]))
    lookup = cluster.routers[1].lookup(key, 10)
    lookup.cancel()
    assert cluster.settle(lookup.next_provider()) is None
