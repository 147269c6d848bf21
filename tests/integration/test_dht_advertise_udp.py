"""Advertising thousands of keys at once over real UDP sockets, on 20 loopback addresses.

One node of 20 places 10,000 keys on its peers in a single ``advertise`` call, as a node
does at start for everything its containerd holds. Every record must arrive and
the advertiser must keep its peers: a burst that overflows socket buffers would
lose records and, if timeouts evicted, empty its routing table. Without the
limit on stores in flight, their retry and ``evicts=False``, this run stored
about 149,000 of its 190,000 records.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred

from spegel_tx.routing.kademlia.node import key_id
from spegel_tx.routing.kademlia.protocol import KademliaProtocol
from spegel_tx.routing.kademlia.router import KademliaRouter
from spegel_tx.testing import FixedBootstrapper
from tests.support.loopback import loopback_hosts

pytestmark = pytest.mark.integration

KEYS = [f"sha256:{random.Random(n).randbytes(32).hex()}" for n in range(10000)]


@pytest.fixture
def routers() -> Iterator[list[KademliaRouter]]:
    started: list[tuple[KademliaRouter, object]] = []
    seed: list[tuple[str, int]] = []  # Every node but the first bootstraps from the first.
    for index, host in enumerate(loopback_hosts(20)):
        protocol = KademliaProtocol(reactor, random.Random(index).randbytes(32), 5000)
        listening = reactor.listenUDP(0, protocol, interface=host)
        port = listening.getHost().port
        router = KademliaRouter(reactor, protocol, FixedBootstrapper(seed), port)
        seed = seed or [(host, port)]
        router.startService()
        started.append((router, listening))
    yield [router for router, _ in started]
    for router, listening in started:
        pytest_twisted.blockon(router.stopService())
        pytest_twisted.blockon(Deferred.fromCoroutine(_stop(listening)))


async def _stop(listening: object) -> None:
    await listening.stopListening()  # type: ignore[attr-defined]


async def _until(check: object, timeout: float = 20.0) -> bool:
    for _ in range(int(timeout / 0.1)):
        if check():  # type: ignore[operator]
            return True
        await task.deferLater(reactor, 0.1, lambda: None)
    return False


@pytest_twisted.ensureDeferred
async def test_one_call_places_every_record_and_keeps_every_peer(
    routers: list[KademliaRouter],
) -> None:
    others = len(routers) - 1
    assert await _until(lambda: all(len(r.protocol.table) == others for r in routers))
    advertiser, holders = routers[0], routers[1:]

    await advertiser.advertise(KEYS)

    stored = sum(
        1 for key in KEYS for holder in holders if holder.protocol.records.providers_of(key_id(key))
    )
    assert stored == len(KEYS) * len(holders), "with 20 nodes, every key lives on all 19 others"
    assert len(advertiser.protocol.table) == others, "no peer was evicted by the burst"
    assert advertiser.protocol.counters["stores_lost"] == 0
