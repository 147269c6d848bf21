"""Stopping a node as a rolling update does: on a MemoryReactorClock, with connections
on in-memory transports; nothing listens and no signal is sent."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from spegel_tx.registry.access import RegistryChannel, RegistrySite
from spegel_tx.shutdown import GracefulNode


class Held(Resource):
    """Answers ``/quick`` at once; ``/slow`` only when the test finishes it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.open: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        if request.path == b"/quick":
            return b"done"
        request.setHeader(b"content-length", b"4")
        request.write(b"sl")
        self.open.append(request)
        return NOT_DONE_YET


class Transport(StringTransportWithDisconnection):
    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class Recorded(Service):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self._log = log

    def stopService(self) -> None:
        super().stopService()
        self._log.append(self.name)


class Cluster:
    """A node with a tracker, a router and a listener that record when they stop."""

    def __init__(self, grace: float = 20.0) -> None:
        self.reactor = MemoryReactorClock()
        self.resource = Held()
        self.site = RegistrySite(self.resource)
        self.stopped: list[str] = []
        self.node = GracefulNode(self.reactor, grace)
        services = {
            name: Recorded(name, self.stopped) for name in ("store", "tracker", "router", "tcp")
        }
        for service in services.values():
            service.setServiceParent(self.node)
        self.node.drains(self.site, services["tcp"], services["tracker"], services["router"])
        self.node.startService()

    def connect(self, *paths: bytes) -> tuple[RegistryChannel, Transport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert isinstance(channel, RegistryChannel)
        transport = Transport()
        transport.protocol = channel
        channel.makeConnection(transport)
        for path in paths:
            channel.dataReceived(b"GET %s HTTP/1.1\r\nHost: node\r\n\r\n" % path)
        return channel, transport


def fired(d: Any) -> bool:
    results: list[Any] = []
    d.addBoth(lambda r: (results.append(r), r)[1])
    return bool(results)


def test_stopping_withdraws_first_closes_idle_connections_and_waits_for_busy_ones() -> None:
    cluster = Cluster()
    _, idle = cluster.connect(b"/quick")
    _, busy = cluster.connect(b"/slow")

    stopped = cluster.node.stopService()

    assert cluster.node.stopping, "/readyz answers 503 from now on"
    assert cluster.stopped == ["tracker", "router", "tcp"], "withdrawn, then no new connections"
    assert not idle.connected, "an idle kept-alive connection closes at once"
    assert busy.connected
    assert not fired(stopped)
    cluster.reactor.advance(19)
    cluster.resource.open[0].write(b"ow")
    cluster.resource.open[0].finish()

    assert b"slow" in busy.value()
    assert not busy.connected, "closed once its response is done"
    assert fired(stopped)
    assert cluster.stopped[-1] == "store", "the rest stops after the drain"


def test_the_grace_period_cuts_what_is_still_open() -> None:
    cluster = Cluster(grace=20.0)
    _, busy = cluster.connect(b"/slow")

    stopped = cluster.node.stopService()
    cluster.reactor.advance(19.9)
    assert not fired(stopped)
    cluster.reactor.advance(0.1)

    assert getattr(busy, "aborted", False)
    assert fired(stopped)


def test_a_second_sigterm_cuts_the_drain_short_and_the_first_stops_the_reactor() -> None:
    cluster = Cluster(grace=20.0)
    _, busy = cluster.connect(b"/slow")

    cluster.node.terminate()
    assert cluster.reactor.hasStopped, "the first SIGTERM stops the reactor, which stops the node"
    stopped = cluster.node.stopService()
    cluster.node.terminate()

    assert getattr(busy, "aborted", False)
    assert fired(stopped)
    assert cluster.reactor.seconds() == 0


def test_with_nothing_open_the_node_stops_at_once() -> None:
    cluster = Cluster()

    assert fired(cluster.node.stopService())


def test_readyz_answers_503_while_the_node_stops() -> None:
    from treq.testing import StubTreq

    from spegel_tx.readiness import Readiness
    from spegel_tx.registry.app import Registry
    from spegel_tx.testing import MemoryStore

    stopping = [False]
    store = MemoryStore()
    readiness = Readiness(store, None, lambda: stopping[0])
    client = StubTreq(Registry(MemoryReactorClock(), store, readiness=readiness).resource())

    def readyz() -> tuple[int, bytes]:
        response = client.get("http://node/readyz")
        client.flush()
        body = client.content(response.result)
        client.flush()
        return response.result.code, body.result

    assert readyz() == (200, b"ok\n")
    stopping[0] = True
    assert readyz() == (503, b"shutting down\n")
