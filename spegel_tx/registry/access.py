"""One log event per HTTP request, written when the request ends, however it ends."""

from __future__ import annotations

import io
import time
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Request, Site

from spegel_tx.listeners import unmapped
from spegel_tx.nodemetrics import NodeMetrics
from spegel_tx.reclaim import Reclaimer
from spegel_tx.registry.connections import enlarge_buffers

_log = Logger(namespace="spegel_tx.access")


class AccessLogRequest(Request):
    """A request that logs itself once finished or cut off.

    Bytes sent by sendfile bypass ``write``; the sender adds them to
    ``sentLength`` so the log shows what really left the node.
    """

    handler = "-"
    peer = "-"

    def gotLength(self, length: int | None) -> None:
        """The pull-only registry reads no request body: whatever is sent there is dropped
        as it arrives, where Twisted would spool a large one to a temporary file."""
        if getattr(getattr(self.channel, "site", None), "reads_bodies", False):
            super().gotLength(length)
        else:
            self.content = _Discarded()

    def process(self) -> None:
        self._started = time.monotonic()
        site = getattr(self.channel, "site", None)
        self._metrics: NodeMetrics | None = getattr(site, "metrics", None)
        self._reclaimer: Reclaimer | None = getattr(site, "reclaimer", None)
        if self._metrics is not None:
            self._metrics.request_started(self.path)
        self.notifyFinish().addBoth(self._log_access)
        super().process()

    def _log_access(self, result: Failure | None) -> None:
        if result is not None and self._reclaimer is not None:
            self._reclaimer.soon()
        seconds = time.monotonic() - self._started
        method = self.method.decode("ascii", "replace")
        _log.info(
            "{method} {path} {status} {bytes}B {duration_ms}ms {handler} {client}",
            method=method,
            path=self.uri.decode("utf-8", "replace"),
            status=self.code,
            bytes=self.sentLength,
            duration_ms=round(seconds * 1000, 3),
            client=unmapped(getattr(self.getClientAddress(), "host", "-")),
            handler=self.handler,
            peer=self.peer,
            completed=result is None,
        )
        if self._metrics is not None:
            self._metrics.request_finished(
                self.path,
                method,
                self.code,
                self.sentLength,
                seconds,
                served_by=self.handler,
                registry=requested_registry(self) or "",
                peer=self.peer,
                completed=result is None,
            )


class _Discarded(io.BytesIO):
    def write(self, data: Any) -> int:
        return len(data)


def requested_registry(request: Any) -> str | None:
    """The registry a request names in containerd's ``ns`` parameter, if any."""
    values = request.args.get(b"ns")
    return values[0].decode("utf-8", "replace") if values else None


def set_handler(request: Any, handler: str, peer: str = "-") -> None:
    """Name what served the request (``local`` or ``mirror``, and the peer's
    registry address) in its log line."""
    if isinstance(request, AccessLogRequest):
        request.handler = handler
        request.peer = peer


TLS_HANDSHAKE = b"\x16\x03"
"""The first bytes of a TLS ClientHello record."""


class RegistryChannel(http.HTTPChannel):
    """Plain HTTP/1.1 (so sendfile can reach the TCP socket) that refuses TLS at once.

    Clients such as skopeo try https first; unanswered, a ClientHello waits
    for a line ending until the client's handshake timeout (10 s). Answering
    as Go's servers do makes them fall back to plain HTTP immediately.
    """

    _first_bytes = True
    site: RegistrySite

    def connectionMade(self) -> None:
        enlarge_buffers(self.transport)
        super().connectionMade()
        self.site.opened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.site.closed(self)

    def busy(self) -> bool:
        """A request is being read or answered on this connection."""
        return bool(self.requests)

    def dataReceived(self, data: bytes) -> None:
        if self._first_bytes:
            self._first_bytes = False
            if data.startswith(TLS_HANDSHAKE) and self.transport is not None:
                self.transport.write(
                    b"HTTP/1.0 400 Bad Request\r\n\r\n"
                    b"Client sent an HTTP request to an HTTPS server.\n"
                )
                self.transport.loseConnection()
                return
        super().dataReceived(data)


class RegistrySite(Site):
    """A Site whose only request log is ``AccessLogRequest``'s structured event,
    which also feeds the node's metrics when it has some."""

    requestFactory = AccessLogRequest
    noisy = False  # no "Starting factory <...>" line: the node's startup line says it all
    # Twisted annotates this as its private HTTP/2-negotiating wrapper; a plain
    # HTTPChannel is what HTTPFactory built before that wrapper existed.
    protocol = RegistryChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Any,
        metrics: NodeMetrics | None = None,
        reclaimer: Reclaimer | None = None,
        reads_bodies: bool = False,
    ) -> None:
        """``reads_bodies``: requests here may carry a body (the debug page's forms)."""
        super().__init__(resource)
        self.metrics = metrics
        self.reclaimer = reclaimer
        self.reads_bodies = reads_bodies
        self.channels: set[RegistryChannel] = set()
        self._all_closed: list[Deferred[None]] = []

    def log(self, request: http.Request) -> None:
        pass

    def opened(self, channel: RegistryChannel) -> None:
        self.channels.add(channel)

    def closed(self, channel: RegistryChannel) -> None:
        self.channels.discard(channel)
        if not self.channels:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)

    def drain(self) -> Deferred[None]:
        """Close idle connections now and the others once their response is done; fires
        when none is left. A client whose idle kept-alive connection closes sends its
        next request on a new one, which reaches another mirror target."""
        for channel in list(self.channels):
            channel.persistent = False
            if not channel.busy():
                channel.loseConnection()
        if not self.channels:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._all_closed.append(d)
        return d

    def abort(self) -> None:
        """Cut every connection still open: the grace period is over."""
        for channel in list(self.channels):
            cast(ITCPTransport, channel.transport).abortConnection()
