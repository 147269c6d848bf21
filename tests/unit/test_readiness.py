"""One readiness: ``/readyz``, ``/debug/peers`` and the debug page's ``api/node`` give the
same answer and the same reasons in every case, on memory parts and as the service
wires them."""

from __future__ import annotations

import json
from typing import Any

import pytest
import treq
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor

from spegel_tx.debug import DebugPages
from spegel_tx.debugweb import DebugWeb
from spegel_tx.nodemetrics import NodeMetrics
from spegel_tx.readiness import CONTAINERD_DOWN, NO_PEER, Readiness
from spegel_tx.registry.app import Registry
from spegel_tx.registry.mirror import MirrorSettings
from spegel_tx.routing.kademlia.messages import Contact
from spegel_tx.routing.kademlia.protocol import KademliaProtocol
from spegel_tx.routing.kademlia.router import KademliaRouter
from spegel_tx.service import metrics_root
from spegel_tx.state import StateTracker
from spegel_tx.testing import FixedBootstrapper, MemoryStore
from tests.unit.test_startup import NodeReactor, build


def answer(client: StubTreq, url: str) -> tuple[int, bytes]:
    response = client.get(url)
    client.flush()
    body = treq.content(response.result)
    client.flush()
    return response.result.code, body.result


def surfaces(registry: Any, metrics: Any) -> dict[str, tuple[bool, list[str]]]:
    """What each page says: ready or not, and why not."""
    code, body = answer(StubTreq(registry), "http://node/readyz")
    readyz = (code == 200, [] if code == 200 else body.decode().splitlines())
    said = {"/readyz": readyz}
    for path in ("/debug/peers", "/debug/web/api/node"):
        code, body = answer(StubTreq(metrics), f"http://node{path}")
        assert code == 200, path
        page = json.loads(body)
        said[path] = (page["ready"], page["not_ready_because"])
    return said


class MemoryNode:
    def __init__(self, forwards: bool) -> None:
        clock = Clock()
        self.store = MemoryStore()
        self.protocol = KademliaProtocol(clock, b"\x01" * 32, registry_port=5000)
        router = KademliaRouter(clock, self.protocol, FixedBootstrapper([]), 5001)
        readiness = Readiness(self.store, router if forwards else None)
        metrics = NodeMetrics(clock)
        tracker = StateTracker(clock, self.store, router)
        web = DebugWeb(
            clock, router, self.protocol, tracker, metrics, None, MirrorSettings(), readiness, {}
        )
        pages = DebugPages(clock, router, readiness, web.resource())
        self.registry = Registry(MemoryReactor(), self.store, readiness=readiness).resource()
        self.metrics = metrics_root(metrics, pages)

    def meet_a_peer(self) -> None:
        self.protocol.table.seen(Contact(b"\x02" * 32, "10.0.0.2", 5001), now=0.0)

    def said(self) -> dict[str, tuple[bool, list[str]]]:
        return surfaces(self.registry, self.metrics)


@pytest.mark.parametrize(
    ("forwards", "containerd_up", "has_peer", "reasons"),
    [
        pytest.param(False, True, False, [], id="one node alone"),
        pytest.param(False, False, False, [CONTAINERD_DOWN], id="alone, containerd down"),
        pytest.param(True, True, False, [NO_PEER], id="peers configured, none found yet"),
        pytest.param(True, True, True, [], id="peers configured and found"),
        pytest.param(True, False, True, [CONTAINERD_DOWN], id="containerd down, a peer"),
        pytest.param(True, False, False, [CONTAINERD_DOWN, NO_PEER], id="neither"),
    ],
)
def test_every_page_gives_the_same_answer(
    forwards: bool, containerd_up: bool, has_peer: bool, reasons: list[str]
) -> None:
    node = MemoryNode(forwards)
    node.store.is_ready = containerd_up
    if has_peer:
        node.meet_a_peer()
    said = node.said()
    assert said == dict.fromkeys(said, (not reasons, reasons))


def registry_and_metrics(reactor: NodeReactor) -> tuple[Any, Any]:
    sites = {port: factory for port, factory, _, _ in reactor.tcpServers}
    return sites[5000].resource, sites[9090].resource


@pytest.mark.parametrize(
    ("keys", "reasons"),
    [
        pytest.param({}, [CONTAINERD_DOWN], id="alone"),
        pytest.param(
            {"static-bootstrap-peers": ["10.0.0.2:5001"]},
            [CONTAINERD_DOWN, NO_PEER],
            id="with a bootstrap peer",
        ),
    ],
)
def test_the_service_gives_every_page_the_same_readiness(
    keys: dict[str, Any], reasons: list[str]
) -> None:
    """Before containerd has answered (the store is not started here)."""
    reactor = NodeReactor()
    build(reactor, **{"debug-web-enabled": True, **keys}).privilegedStartService()
    said = surfaces(*registry_and_metrics(reactor))
    assert said == dict.fromkeys(said, (False, reasons))
    assert set(said) == {"/readyz", "/debug/peers", "/debug/web/api/node"}
