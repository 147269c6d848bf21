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
from typing import Any, cast

from twisted.internet import abstract
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer, IReactorFDSet, IWriteDescriptor
from twisted.internet.protocol import Protocol, connectionDone
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


class PeerBodyBroken(Exception):
    """A peer's response body stopped before its length: resume from another provider."""


class PeerTooSlow(PeerBodyBroken):
    """A peer's body came slower than the relay's floor."""


RATE_WINDOW = 10.0
"""Seconds over which a peer's pace is held to the relay's ``min_rate``: long enough
that a pause in a healthy transfer passes, short enough that a trickle is left soon."""


@implementer(IPushProducer)
class PeerBodyRelay:
    """Writes the bodies of one or more peer responses to the client, as one body.

    A resumed transfer is a second response that continues where the first
    broke off; the client sees only a pause. The client's backpressure pauses
    whichever peer is sending now. With a ``hasher`` (hashlib) the latest chunk is kept
    back until ``finish``, so a client is never handed a complete body whose
    digest has not yet been checked.
    """

    def __init__(
        self,
        clock: Any,
        request: Request,
        idle_timeout: float,
        hasher: Any | None = None,
        min_rate: float = 0.0,
    ) -> None:
        """``min_rate``: bytes a second a peer must average over each RATE_WINDOW in which
        the client did not push back (0: no floor)."""
        self._clock = clock
        self._request = request
        self._idle_timeout = idle_timeout
        self._min_rate = min_rate
        self.hasher = hasher
        self._held = b""
        self._piece: _PeerPiece | None = None
        self._paused = False
        self.client_gone = False
        self.received = 0
        request.write(b"")  # the headers go out now, not with the first body byte
        request.registerProducer(self, True)
        request.notifyFinish().addErrback(lambda _: self.stopProducing())

    def pipe(self, response: Any, length: int) -> Deferred[None]:
        """Relay ``length`` bytes of ``response``'s body; fails with PeerBodyBroken
        (or ConnectionLost if the client went away) when they do not all arrive."""
        if self.client_gone:
            return fail(ConnectionLost("client went away"))
        piece = self._piece = _PeerPiece(self, length)
        response.deliverBody(piece)
        return piece.done

    def finish(self) -> None:
        """Hand over the held-back chunk and let go of the client's transport."""
        if self._held and not self.client_gone:
            self._request.write(self._held)
        self._held = b""
        self._release()

    def abandon(self) -> None:
        self._held = b""
        self._release()

    def _release(self) -> None:
        if self._request.producer is not None and self._request.channel is not None:
            self._request.unregisterProducer()

    def _take(self, data: bytes) -> None:
        self.received += len(data)
        if self.hasher is not None:
            self.hasher.update(data)
        if self.client_gone:
            return
        if self.hasher is None:
            self._request.write(data)
            return
        held, self._held = self._held, data
        if held:
            self._request.write(held)

    # The client's transport pauses, resumes and stops whichever peer is sending.

    def pauseProducing(self) -> None:
        self._paused = True
        if self._piece is not None:
            self._piece.pause()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._piece is not None:
            self._piece.resume()

    def stopProducing(self) -> None:
        if self.client_gone:
            return
        self.client_gone = True
        if self._piece is not None:
            self._piece.stop(ConnectionLost("client went away"))


class _PeerPiece(Protocol):
    """Receives one peer response body, with an idle timeout between chunks and a
    floor on its pace: a peer that trickles is as useless as one that stalls."""

    def __init__(self, relay: PeerBodyRelay, length: int) -> None:
        self._relay = relay
        self._remaining = length
        self._idle: Any = None
        self._pace: Any = None
        self._window_bytes = 0
        self._paused = False
        self.done: Deferred[None] = Deferred()

    def _producer(self) -> IPushProducer:
        """What ``deliverBody`` connects a body protocol to: the peer connection's producer."""
        return cast(IPushProducer, self.transport)

    def connectionMade(self) -> None:
        if self._relay._paused:
            self.pause()
        self._arm()

    def _arm(self) -> None:
        """Start the idle timer, or push it back, and the pace check. Called for every
        chunk: pushing a DelayedCall later (``reset``) only records the new time, where
        cancelling and scheduling anew would reorder the reactor's timer heap each time."""
        if self._paused or self.done.called:
            self._disarm()
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._relay._idle_timeout)
        else:
            self._idle = self._relay._clock.callLater(
                self._relay._idle_timeout, self.stop, PeerBodyBroken("the peer stalled")
            )
        if self._relay._min_rate and self._pace is None:
            self._window_bytes = 0
            self._pace = self._relay._clock.callLater(RATE_WINDOW, self._check_pace)

    def _check_pace(self) -> None:
        self._pace = None
        floor = self._relay._min_rate * RATE_WINDOW
        if self._window_bytes < floor:
            rate = self._window_bytes / RATE_WINDOW
            self.stop(PeerTooSlow(f"the peer sent {rate:.0f} B/s, under the floor"))
        else:
            self._arm()

    def _disarm(self) -> None:
        for timer in (self._idle, self._pace):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle = self._pace = None

    def pause(self) -> None:
        """A slow client is not a slow peer: no idle timeout or pace check while paused."""
        self._paused = True
        self._disarm()
        if self.transport is not None:
            self._producer().pauseProducing()

    def resume(self) -> None:
        self._paused = False
        self._arm()
        if self.transport is not None:
            self._producer().resumeProducing()

    def stop(self, reason: Exception) -> None:
        if self.done.called:
            return
        self._end(Failure(reason))
        if self.transport is not None:
            self._producer().stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        data = data[: self._remaining]
        self._remaining -= len(data)
        self._window_bytes += len(data)
        self._arm()
        self._relay._take(data)
        if self._remaining == 0:
            self._end(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._remaining:
            self._end(Failure(PeerBodyBroken(f"{self._remaining} bytes missing: {reason.value}")))
        else:
            self._end(None)

    def _end(self, reason: Failure | None) -> None:
        self._disarm()
        if self.done.called:
            return
        if reason is None:
            self.done.callback(None)
        else:
            self.done.errback(reason)
