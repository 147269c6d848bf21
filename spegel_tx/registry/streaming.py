"""Send a blob's bytes to an HTTP client without holding the blob in memory.

Two ways, chosen per request:

- ``_SendfileWriter``: the kernel copies file to socket (``os.sendfile``),
  driven by the reactor's writability events. Measured at parity with nginx
  (see shared/PERFORMANCE.md); only for plain HTTP/1.x over TCP and a blob
  on local disk.
- ``_BlobPump``: a push producer reading ``IBlob.read`` chunks, paused and
  resumed by the transport. For TLS, HTTP/2, and blobs not on disk.

Both return a Deferred that fires once the last byte is handed to the kernel
(or to Twisted's buffer), errbacks with ``ConnectionLost`` if the client goes
away, and can be cancelled.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet import abstract
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer, IReactorFDSet, IWriteDescriptor
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import Request
from zope.interface import implementer

from spegel_tx.interfaces import IBlob

PUMP_CHUNK = 1024 * 1024
"""Copying reads of 1 MiB reached 0.6 of nginx here; smaller ones far less."""

SENDFILE_SLICE = 4 * 1024 * 1024
"""Most bytes sent per writability event, so concurrent downloads share the loop."""


class BlobTruncated(Exception):
    """The blob ended before the length the client was promised."""


def send_blob(
    reactor: Any, request: Request, blob: IBlob, offset: int, length: int
) -> Deferred[None]:
    """Write ``length`` bytes of ``blob`` from ``offset`` as the response body.

    The caller has set the status and a ``Content-Length`` of ``length``.
    """
    if length == 0:
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d
    fileno = blob.fileno()
    transport = _sendfile_transport(reactor, request)
    if fileno is not None and transport is not None:
        return _SendfileWriter(reactor, request, transport, fileno, offset, length).start()
    return _BlobPump(request, blob, offset, length).start()


def _sendfile_transport(reactor: Any, request: Request) -> abstract.FileDescriptor | None:
    """The TCP transport under ``request`` if sendfile can write to it directly."""
    if not hasattr(os, "sendfile") or not IReactorFDSet.providedBy(reactor):
        return None
    channel = request.channel
    if not isinstance(channel, HTTPChannel) or request.isSecure():
        return None
    transport = channel.transport
    if not isinstance(transport, abstract.FileDescriptor) or not transport.connected:
        return None
    return transport


def _pending_bytes(transport: abstract.FileDescriptor) -> int:
    """Bytes Twisted still holds for the socket (status line and headers)."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@implementer(IWriteDescriptor)
class _SendfileWriter:
    """A write descriptor on a ``dup`` of the client's socket.

    The duplicate gives the reactor a descriptor of our own to watch; the
    connection's own descriptor is already Twisted's. Nothing is sent until
    Twisted's buffer (the headers) has drained, or bytes would overtake it.
    """

    def __init__(
        self,
        reactor: Any,
        request: Request,
        transport: abstract.FileDescriptor,
        file_fd: int,
        offset: int,
        length: int,
    ) -> None:
        self._reactor = reactor
        self._request = request
        self._transport = transport
        self._file_fd = file_fd
        self._offset = offset
        self._remaining = length
        self._socket_fd = -1
        self._done: Deferred[None] = Deferred(lambda _: self._release())

    def start(self) -> Deferred[None]:
        self._request.write(b"")  # queue the status line and headers ahead of the body
        self._socket_fd = os.dup(self._transport.fileno())
        self._reactor.addWriter(self)
        return self._done

    def fileno(self) -> int:
        return self._socket_fd

    def logPrefix(self) -> str:
        return "sendfile"

    def doWrite(self) -> None:
        if not self._transport.connected:
            self._stop(Failure(ConnectionLost("client went away")))
            return
        if _pending_bytes(self._transport):
            return
        budget = SENDFILE_SLICE
        while budget > 0 and self._remaining > 0:
            try:
                sent = os.sendfile(
                    self._socket_fd, self._file_fd, self._offset, min(budget, self._remaining)
                )
            except BlockingIOError:
                return
            except OSError as e:
                lost = e.errno in (errno.EPIPE, errno.ECONNRESET)
                self._stop(Failure(ConnectionLost(str(e)) if lost else e))
                return
            if sent == 0:
                self._stop(Failure(BlobTruncated(f"file ended {self._remaining} bytes early")))
                return
            self._offset += sent
            self._remaining -= sent
            budget -= sent
            self._request.sentLength += sent
        if self._remaining == 0:
            self._stop(None)

    def connectionLost(self, reason: Failure) -> None:
        self._stop(reason)

    def _release(self) -> None:
        """Unregister before closing, or the closed descriptor lingers in epoll."""
        if self._socket_fd < 0:
            return
        self._reactor.removeWriter(self)
        os.close(self._socket_fd)
        self._socket_fd = -1

    def _stop(self, reason: Failure | None) -> None:
        self._release()
        if self._done.called:
            return
        if reason is None:
            self._done.callback(None)
        else:
            self._done.errback(reason)


@implementer(IPushProducer)
class _BlobPump:
    """Reads chunks only while the transport wants more; one read in flight at a time."""

    def __init__(self, request: Request, blob: IBlob, offset: int, length: int) -> None:
        self._request = request
        self._blob = blob
        self._position = offset
        self._remaining = length
        self._paused = False
        self._reading = False
        self._looping = False
        self._done: Deferred[None] = Deferred(lambda _: self._release())

    def start(self) -> Deferred[None]:
        self._request.registerProducer(self, True)
        self._pump()
        return self._done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._stop(Failure(ConnectionLost("client went away")))

    def _pump(self) -> None:
        """Read while allowed; a read that completes at once continues this loop
        instead of recursing, so a fast local file cannot exhaust the stack."""
        if self._looping:
            return
        self._looping = True
        try:
            while not (self._paused or self._reading or self._done.called or not self._remaining):
                self._reading = True
                d = self._blob.read(self._position, min(PUMP_CHUNK, self._remaining))
                d.addCallbacks(self._received, lambda f: self._stop(f))
        finally:
            self._looping = False

    def _received(self, data: bytes) -> None:
        self._reading = False
        if self._done.called:
            return
        if not data:
            self._stop(Failure(BlobTruncated(f"blob ended {self._remaining} bytes early")))
            return
        data = data[: self._remaining]
        self._position += len(data)
        self._remaining -= len(data)
        self._request.write(data)
        if self._remaining == 0:
            self._stop(None)
        else:
            self._pump()

    def _release(self) -> None:
        """Unregister unless the connection already dropped the request."""
        if self._request.producer is self and self._request.channel is not None:
            self._request.unregisterProducer()

    def _stop(self, reason: Failure | None) -> None:
        if self._done.called:
            return
        self._release()
        if reason is None:
            self._done.callback(None)
        else:
            self._done.errback(reason)
