"""Connections that carry blobs get 1 MiB buffers, on the client side and on the server side."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from spegel_tx.registry.access import RegistrySite
from spegel_tx.registry.connections import TRANSFER_BUFFER, _EnlargedEndpoint, peer_agent


class TCPLikeTransport(StringTransport):
    bufferSize = 65536


def test_registry_connections_read_and_buffer_a_mebibyte() -> None:
    transport = TCPLikeTransport()
    channel = RegistrySite(None).buildProtocol(None)
    channel.makeConnection(transport)
    assert transport.bufferSize == TRANSFER_BUFFER


class ConnectedEndpoint:
    def __init__(self) -> None:
        self.transport = TCPLikeTransport()

    def connect(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(self.transport)
        return succeed(protocol)


def test_peer_connections_read_and_buffer_a_mebibyte() -> None:
    inner = ConnectedEndpoint()
    protocols: list[Any] = []
    _EnlargedEndpoint(inner).connect(Factory.forProtocol(Protocol)).addCallback(protocols.append)
    assert protocols and inner.transport.bufferSize == TRANSFER_BUFFER


def test_the_peer_agent_connects_with_its_timeout_and_keeps_connections() -> None:
    reactor = MemoryReactorClock()
    agent = peer_agent(reactor, connect_timeout=1.5, connections_per_peer=8)
    agent.request(b"GET", b"http://127.0.0.2:5000/v2/")
    assert agent._pool.persistent and agent._pool.maxPersistentPerHost == 8
    agent.request(b"GET", b"http://[fd00::2]:5001/v2/")
    assert [(host, timeout, port) for host, port, _, timeout, _ in reactor.tcpClients] == [
        ("127.0.0.2", 1.5, 5000),
        ("fd00::2", 1.5, 5001),
    ], "an IP is connected to directly, with the connect timeout"
