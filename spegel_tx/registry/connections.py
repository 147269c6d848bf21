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

from collections.abc import Callable, Sequence
from typing import Any

from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

TRANSFER_BUFFER = 1024 * 1024

SEND_LIMIT = 4 * TRANSFER_BUFFER
"""More than the write buffer ever holds (TRANSFER_BUFFER and the chunk that filled
it), so one writability event offers the kernel everything that waits."""

ATTEMPT_DELAY = 0.05
"""Seconds before a peer's next address is tried while the one before has neither
connected nor failed. A connection inside a cluster takes a millisecond or less;
an address that fails at once (refused, no route) hands over at once."""


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


@implementer(IStreamClientEndpoint)
class RacingEndpoint:
    """One peer at several addresses (IPv4 and IPv6): each is tried in turn, the next
    after ``delay`` seconds or as soon as the one before fails, and the first to
    connect is used; the attempts still under way are cancelled (RFC 8305's race)."""

    def __init__(
        self, clock: Any, endpoints: Sequence[IStreamClientEndpoint], delay: float = ATTEMPT_DELAY
    ) -> None:
        self._clock = clock
        self._endpoints = endpoints
        self._delay = delay

    def connect(self, protocol_factory: IProtocolFactory) -> Deferred[IProtocol]:
        waiting = list(self._endpoints)
        attempts: list[Deferred[IProtocol]] = []
        timer: list[Any] = []

        def stop_timer() -> None:
            while timer:
                call = timer.pop()
                if call.active():
                    call.cancel()

        def give_up(_: object) -> None:
            stop_timer()
            waiting.clear()
            for attempt in list(attempts):
                attempt.cancel()

        result: Deferred[IProtocol] = Deferred(give_up)

        def start_next() -> None:
            stop_timer()
            if not waiting:
                return
            attempt = waiting.pop(0).connect(protocol_factory)
            attempts.append(attempt)
            attempt.addCallbacks(connected, failed, errbackArgs=(attempt,))
            if waiting and attempt in attempts:
                timer.append(self._clock.callLater(self._delay, start_next))

        def connected(protocol: IProtocol) -> None:
            if result.called:
                # Connected in the same turn as another: this one is surplus.
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.loseConnection()
                return
            give_up(None)
            result.callback(protocol)

        def failed(failure: Failure, attempt: Deferred[IProtocol]) -> None:
            attempts.remove(attempt)
            if result.called:
                return
            if waiting:
                start_next()
            elif not attempts:
                result.errback(failure)

        start_next()
        return result


@implementer(IAgentEndpointFactory)
class _PeerEndpoints:
    def __init__(
        self, reactor: Any, connect_timeout: float, hosts_of: Callable[[str], list[str]]
    ) -> None:
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._hosts_of = hosts_of

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """A peer at every address its node is known by (a dual-stack pod has two),
        raced when there are several."""
        host = uri.host.decode("ascii")
        endpoints = [self._endpoint(each, uri.port) for each in self._hosts_of(host)]
        if len(endpoints) == 1:
            return _EnlargedEndpoint(endpoints[0])
        return _EnlargedEndpoint(RacingEndpoint(self._reactor, endpoints))

    def _endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        """Peers are IP addresses (from the DHT): connect to them directly.
        HostnameEndpoint would wait its 0.3 s attempt delay before reporting
        a refused connection, long enough for every request to a dead peer
        to pay the hedge delay instead of failing over at once."""
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, port, self._connect_timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, port, self._connect_timeout)
        return HostnameEndpoint(self._reactor, host.encode("ascii"), port, self._connect_timeout)


class _AsciiURL(EncodedURL):
    """A URL already in ASCII, as every peer URL is: treq sends each URL through
    hyperlink's ``to_uri``, which IDNA-encodes the host, and idna 3 refuses the
    colons of an IPv6 literal (``http://[fd00::1]:5000/`` fails before any
    connection is tried)."""

    def to_uri(self) -> EncodedURL:
        return self


class PeerClient(HTTPClient):
    """treq's client for peer URLs, IPv6 literals included."""

    def request(self, method: str, url: Any, **kwargs: Any) -> Any:
        if isinstance(url, str):
            url = _AsciiURL.from_text(url)
        return super().request(method, url, **kwargs)


def peer_agent(
    reactor: Any,
    connect_timeout: float,
    connections_per_peer: int,
    hosts_of: Callable[[str], list[str]] = lambda host: [host],
) -> Agent:
    """An Agent keeping connections to peers alive, each with large buffers;
    ``hosts_of`` gives every address of the peer at an address."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = connections_per_peer
    endpoints = _PeerEndpoints(reactor, connect_timeout, hosts_of)
    return Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
