"""TCP connections sized for moving blobs.

Twisted reads at most ``bufferSize`` bytes per readiness event and pauses a
producer once that much waits to be written; its default, 64 KiB, makes a
relay stop and start for every 64 KiB that passes. 1 MiB more than doubled
the relay's throughput here (bench/pull.py), and larger sizes did worse.
Each ``send`` is also capped, at ``SEND_LIMIT`` (128 KiB by default): one
cap per writability event made every relayed MiB take eight trips through the
reactor; lifting it above what the buffer holds made the relay 1.4 times as
fast for a quarter less CPU.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

TRANSFER_BUFFER = 1024 * 1024

SEND_LIMIT = 4 * TRANSFER_BUFFER
"""More than the write buffer ever holds (TRANSFER_BUFFER and the chunk that filled
it), so one writability event offers the kernel everything that waits."""


def enlarge_buffers(transport: Any) -> None:
    """Give one connection TRANSFER_BUFFER and SEND_LIMIT; a transport without the
    knobs keeps its own."""
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = TRANSFER_BUFFER
    if hasattr(transport, "SEND_LIMIT"):
        transport.SEND_LIMIT = SEND_LIMIT


@implementer(IStreamClientEndpoint)
class _EnlargedEndpoint:
    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocol_factory: IProtocolFactory) -> Deferred[IProtocol]:
        def connected(protocol: IProtocol) -> IProtocol:
            enlarge_buffers(getattr(protocol, "transport", None))
            return protocol

        return self._endpoint.connect(protocol_factory).addCallback(connected)


@implementer(IAgentEndpointFactory)
class _PeerEndpoints:
    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._connect_timeout = connect_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """Peers are IP addresses (from the DHT): connect to them directly.
        HostnameEndpoint would wait its 0.3 s attempt delay before reporting
        a refused connection, long enough for every request to a dead peer
        to pay the hedge delay instead of failing over at once."""
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, self._connect_timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, self._connect_timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, self._connect_timeout)
        return _EnlargedEndpoint(endpoint)


def peer_agent(reactor: Any, connect_timeout: float, connections_per_peer: int) -> Agent:
    """An Agent keeping connections to peers alive, each with large buffers."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = connections_per_peer
    endpoints = _PeerEndpoints(reactor, connect_timeout)
    return Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
