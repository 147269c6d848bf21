"""Serve what this node lacks from a peer that holds it, or say 404 fast.

containerd waits on the mirror before it falls back to the real registry, so
every step is bounded: a lookup idle for ``resolve_timeout`` ends the wait,
each peer has a time to answer headers and an idle time on its body, and a
peer slower than the learned hedge delay gets a second provider racing it.
A body that breaks part-way resumes from the next provider with ``Range``;
a full blob is hashed as it passes and cut off if its digest is wrong.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred, DeferredQueue
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import Request

from spegel_tx.config import Address
from spegel_tx.content import Descriptor, in_flight_key
from spegel_tx.errors import NotFound
from spegel_tx.interfaces import IRouter
from spegel_tx.logs import error_text
from spegel_tx.nodemetrics import NodeMetrics
from spegel_tx.oci.manifest import MAX_MANIFEST_SIZE, children
from spegel_tx.oci.ranges import content_range
from spegel_tx.registry.access import requested_registry, set_handler
from spegel_tx.registry.peers import Fault, Peer, PeerHealth, PreferComplete, Providers
from spegel_tx.registry.streaming import PeerBodyBroken, PeerBodyRelay, PeerTooSlow

_log = Logger()

MIRRORED_HEADER = b"x-spegel-mirrored"
"""Set on every forwarded request; a peer never forwards such a request again."""

IN_FLIGHT_HEADER = b"x-spegel-in-flight"
"""Set by a peer on a blob it is still downloading: its bytes come as they arrive."""

_COPIED_HEADERS = (
    b"content-type",
    b"docker-content-digest",
    b"etag",
    b"accept-ranges",
    b"content-range",
)
_HEDGE = object()
_DEADLINE = object()


@dataclass(frozen=True)
class MirrorSettings:
    resolve_timeout: float = 0.020
    """A lookup that finds no new provider for this long is over."""
    resolve_retries: int = 3
    """Providers tried, one after another or side by side, before a 404."""
    response_timeout: float = 2.0
    """From sending a request to a peer until its response headers."""
    idle_timeout: float = 5.0
    """Longest silence inside a peer's response body."""
    manifest_budget: float = 3.0
    """HEAD and manifest requests answer 404 once this has passed without a response."""
    quarantine: float = 30.0
    """How long a peer that refused, timed out or broke off is tried last, unless seen alive."""
    digest_quarantine: float = 600.0
    """How long a peer that sent content with a wrong digest is tried last."""
    resume_timeout: float = 10.0
    """How long a body broken off part-way waits for some provider to resume it."""
    min_throughput: float = 1024 * 1024
    """Bytes a second a peer must average while the client keeps up; a slower one is
    left for the next provider."""
    follow_downloads: bool = True
    """Blobs are also asked of peers still downloading them, when no peer holds them."""


RESUME_PAUSE = 0.1
"""First pause before every provider is asked again to resume a body; it doubles."""
MAX_RESUME_PAUSE = 1.0


class MirrorBodyFailed(Exception):
    """The body could not be completed after headers went out: the client must be cut off."""


class PeerTimedOut(Exception):
    """A peer sent no response headers in time."""


class _PeerAnswered(Exception):
    """A peer answered with a status that is not content; ``fault`` is what it says
    about the peer (None: only that it lacks this key)."""

    def __init__(self, status: int, fault: Fault | None) -> None:
        super().__init__(f"answered {status}")
        self.status = status
        self.fault = fault


class Mirror:
    """Forwards to peers found through an ``IRouter`` with a treq-like ``client``."""

    def __init__(
        self,
        clock: Any,
        router: IRouter,
        client: Any,
        settings: MirrorSettings | None = None,
        health: PeerHealth | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self._clock = clock
        self._router = router
        self._client = client
        self.settings = settings or MirrorSettings()
        self.health = health or PeerHealth(
            clock, self.settings.quarantine, self.settings.digest_quarantine
        )
        self.metrics = metrics or NodeMetrics(clock)
        self.counters: Counter[str] = Counter()
        self.sizes = ExpectedSizes()

    def ready(self) -> bool:
        """Whether any peer is known: until then nothing can be forwarded."""
        return bool(self._router.ready())

    async def forward(self, request: Request, key: str, digest: str | None, manifest: bool) -> None:
        """Answer ``request`` from a provider of ``key``, or raise NotFound.

        ``digest`` is what a full body must hash to (None when only the peer's
        own ``Docker-Content-Digest`` can say). Once the body has started, a
        failure raises MirrorBodyFailed and the caller cuts the connection.
        """
        method = request.method.decode("ascii")
        headers = {MIRRORED_HEADER: [b"true"]}
        for name in (b"accept", b"range"):
            value = request.getHeader(name)
            if value is not None:
                headers[name] = [value]
        wanted = self.settings.resolve_retries + len(self.health.quarantined_peers())
        lookup = self._router.lookup(key, wanted)
        if self.settings.follow_downloads and not manifest and key == digest:
            lookup = PreferComplete(lookup, lambda: self._router.lookup(in_flight_key(key), wanted))
        providers = Providers(
            self._clock,
            lookup,
            self.health,
            self.settings.resolve_retries,
            self.settings.resolve_timeout,
            self.counters,
            self.metrics.resolved,
            key,
        )
        budget = self.settings.manifest_budget if manifest or method == "HEAD" else None
        served = False
        try:
            expected = _Expected(
                ranged=b"range" in headers,
                limit=MAX_MANIFEST_SIZE if manifest else None,
                size=self.sizes.get(digest) if digest else None,
            )
            found = await self._first_response(
                providers, method, request.uri, headers, budget, expected
            )
            if found is None:
                self.counters["not_found"] += 1
                raise NotFound(f"no peer could serve {key}")
            peer, response = found
            if manifest and digest is None and not await self._agreed(providers, request, response):
                _discard(response)
                self.counters["tag_disagreement"] += 1
                raise NotFound(f"providers disagree on what {key} names; ask its registry")
            self.counters["forwarded"] += 1
            if _header(response, IN_FLIGHT_HEADER) == "true":
                self.counters["followed_download"] += 1
            set_handler(request, "mirror", f"{peer[0]}:{peer[1]}")
            request.setResponseCode(response.code)
            for name in _COPIED_HEADERS:
                for value in response.headers.getRawHeaders(name, []):
                    request.setHeader(name, value)
            registry = requested_registry(request)
            if registry is not None and response.code in (200, 206):
                # Set as a local answer sets it: from this request, not the peer's word.
                request.setHeader(b"oci-namespace", registry.encode())
            if method == "HEAD":
                length = response.headers.getRawHeaders(b"content-length", [None])[0]
                if length is not None:
                    request.setHeader(b"content-length", length)
            else:
                request.setHeader(b"content-length", b"%d" % response.length)
                # Sizes are learned only from content asked for by digest: a tag's answer
                # is the peer's word, and could poison what honest peers are held to.
                learn = manifest and digest is not None
                if response.code == 200:
                    digest = digest or _header(response, b"docker-content-digest")
                else:
                    digest = None
                await self._relay(request, providers, peer, response, digest, headers, learn)
            served = True
        finally:
            lookup.cancel()
            self.metrics.forwarded(requested_registry(request) or "", served)

    async def _agreed(self, providers: Providers, request: Request, response: Any) -> bool:
        """A tag is not content-addressed: a second provider already found is asked what
        it names, and a disagreement sends containerd to the registry, which decides.
        With one provider only, its word is taken (see the README on tags)."""
        if response.code != 200:
            return True
        other = await providers.spare()
        if other is None:
            return True
        headers = {MIRRORED_HEADER: [b"true"]}
        try:
            answer = await request_peer(
                self._clock,
                self._client,
                "HEAD",
                peer_url(other, request.uri.decode("latin-1")),
                headers,
                self.settings.response_timeout,
            )
        except Exception:
            return True  # no opinion; what failed is charged when it is next tried
        _discard(answer)
        if answer.code != 200:
            return True
        named = _header(answer, b"docker-content-digest")
        return named == _header(response, b"docker-content-digest")

    async def _relay(
        self,
        request: Request,
        providers: Providers,
        peer: Peer,
        response: Any,
        digest: str | None,
        headers: dict[bytes, list[bytes]],
        learn: bool = False,
    ) -> None:
        """``learn``: the body is a manifest asked for by digest; once verified, the sizes
        it gives its children hold their peers to them."""
        hasher: Any = None
        if digest and digest.startswith("sha256:"):
            hasher = _KeptHash() if learn and response.code == 200 else hashlib.sha256()
        relay = PeerBodyRelay(
            self._clock, request, self.settings.idle_timeout, hasher, self.settings.min_throughput
        )
        resumable = response.code in (200, 206)
        first = _range_start(response)
        end = first + response.length
        senders = [peer]
        try:
            while True:
                try:
                    await relay.pipe(response, end - first - relay.received)
                    break
                except PeerBodyBroken as e:
                    if _header(response, IN_FLIGHT_HEADER) == "true":
                        self.counters["download_gave_up"] += 1
                    self._failed(peer, Failure(e))
                at = first + relay.received
                if not resumable:
                    raise MirrorBodyFailed(f"{peer[0]}:{peer[1]} broke off its answer")
                resume = {**headers, b"range": [b"bytes=%d-%d" % (at, end - 1)]}
                found = await self._resume(
                    providers, request.uri, resume, _Expected(True, at, end - at)
                )
                if found is None:
                    raise MirrorBodyFailed(f"no provider left to resume at byte {relay.received}")
                peer, response = found
                self.counters["resumed"] += 1
                senders.append(peer)
            self.counters["bytes_from_peers"] += relay.received
            if hasher is not None and digest and f"sha256:{hasher.hexdigest()}" != digest:
                self.counters["digest_mismatch"] += 1
                for sender in senders:
                    self.health.charge(sender, Fault.LIED)
                    self.health.bad_copy(sender, digest)
                raise MirrorBodyFailed(f"content from {senders} does not match {digest}")
            if isinstance(hasher, _KeptHash):
                self.sizes.learn(children(hasher.data()))
            relay.finish()
        except ConnectionLost as e:
            relay.abandon()
            # The request did not complete: it must not be finished as if it had.
            raise MirrorBodyFailed("the client went away") from e
        except BaseException:
            relay.abandon()
            raise

    async def _resume(
        self,
        providers: Providers,
        uri: bytes,
        headers: dict[bytes, list[bytes]],
        expected: _Expected,
    ) -> tuple[Peer, Any] | None:
        """A provider's answer from byte ``at`` on, asking every known provider again after
        a growing pause (one that refused may be back from a restart) until
        ``resume_timeout`` has passed: the client sees a pause, not an error. When every
        provider asked answered, none of them unreachable, waiting cannot help: the
        client is let go at once, to ask its next mirror or the registry."""
        deadline = self._clock.seconds() + self.settings.resume_timeout
        pause = RESUME_PAUSE
        while True:
            charged: list[Fault | None] = []
            found = await self._first_response(
                providers, "GET", uri, headers, None, expected, charged
            )
            left = deadline - self._clock.seconds()
            if found is not None or left <= 0:
                return found
            if charged and Fault.UNREACHABLE not in charged:
                return None
            await deferLater(self._clock, min(pause, left))
            pause = min(2 * pause, MAX_RESUME_PAUSE)
            providers.again()

    async def _first_response(
        self,
        providers: Providers,
        method: str,
        uri: bytes,
        headers: dict[bytes, list[bytes]],
        budget: float | None,
        expected: _Expected,
        charged: list[Fault | None] | None = None,
    ) -> tuple[Peer, Any] | None:
        """The first provider to answer with content; slow ones are raced by the next.
        ``charged`` gathers what each provider that failed was charged with."""
        events: DeferredQueue[Any] = DeferredQueue()
        live: dict[Peer, Deferred[Any]] = {}
        deadline = self._clock.callLater(budget, events.put, _DEADLINE) if budget else None
        exhausted = False
        try:
            while True:
                if not live:
                    peer = None if exhausted else await providers.next()
                    if peer is None:
                        return None
                    live[peer] = self._request(peer, method, uri, headers, events, expected)
                hedge = None
                if not exhausted:
                    hedge = self._clock.callLater(self.health.hedge_delay(), events.put, _HEDGE)
                event = await events.get()
                if hedge is not None and hedge.active():
                    hedge.cancel()
                if event is _DEADLINE:
                    return None
                if event is _HEDGE:
                    peer = await providers.next()
                    if peer is None:
                        exhausted = True
                    else:
                        self.counters["hedged"] += 1
                        live[peer] = self._request(peer, method, uri, headers, events, expected)
                    continue
                peer, response, failure = event
                live.pop(peer, None)
                if response is not None:
                    return peer, response
                fault = self._failed(peer, failure)
                if charged is not None:
                    charged.append(fault)
        finally:
            if deadline is not None and deadline.active():
                deadline.cancel()
            for loser, attempt in live.items():
                # Only raced, not failed: it may yet serve a resume of this body.
                providers.give_back(loser)
                attempt.cancel()
            # A loser that answered while the winner was being taken: close it.
            for event in events.pending:
                if isinstance(event, tuple) and event[1] is not None:
                    _discard(event[1])

    def _request(
        self,
        peer: Peer,
        method: str,
        uri: bytes,
        headers: dict[bytes, list[bytes]],
        events: DeferredQueue[Any],
        expected: _Expected,
    ) -> Deferred[Any]:
        started = self._clock.seconds()
        attempt = request_peer(
            self._clock,
            self._client,
            method,
            peer_url(peer, uri.decode("latin-1")),
            headers,
            self.settings.response_timeout,
        )

        def answered(response: Any) -> Any:
            fault = _judge(response, method, expected)
            if fault is not None or response.code == 404:
                _discard(response)
                if fault is not Fault.UNREACHABLE:
                    self.health.alive(peer)
                raise _PeerAnswered(response.code, fault)
            self.health.alive(peer)
            self.health.answered(self._clock.seconds() - started)
            return response

        attempt.addCallback(answered)
        attempt.addCallbacks(
            lambda response: events.put((peer, response, None)),
            lambda failure: events.put((peer, None, failure)),
        )
        return attempt

    def _failed(self, peer: Peer, failure: Failure) -> Fault | None:
        """Charge ``peer`` with what the failure says about it, and nothing more."""
        reason = failure.value
        if isinstance(reason, _PeerAnswered):
            fault = reason.fault
        elif isinstance(reason, PeerTooSlow):
            fault = Fault.SLOW
        else:
            fault = Fault.UNREACHABLE
        if fault is None:
            self.counters["peer_not_found"] += 1
        else:
            self.counters["peer_failed"] += 1
            self.health.charge(peer, fault)
        _log.info(
            "peer {peer} failed: {reason}", peer=f"{peer[0]}:{peer[1]}", reason=error_text(reason)
        )
        return fault


@dataclass(frozen=True)
class _Expected:
    """What an answer must be to be relayed."""

    ranged: bool
    """The request carries a ``Range``: a 206 may answer it."""
    resume_at: int | None = None
    """A resume of ours: only a 206 from this byte on will do."""
    length: int | None = None
    """A resume's exact length."""
    limit: int | None = None
    """The most a body may hold (manifests)."""
    size: int | None = None
    """The content's size, when a verified manifest said it (blobs)."""


def _judge(response: Any, method: str, expected: _Expected) -> Fault | None:
    """What an answer says about the peer: None for content, for a 404, and for a
    client's own bad request (400, or 416 to the client's ``Range``), which goes on
    to the client as it is; otherwise the fault to charge the peer with."""
    code = response.code
    length = _declared_length(response, method)
    if code == 404:
        return None
    if expected.resume_at is not None:
        exact = code == 206 and length == expected.length
        if exact and _range_start(response) == expected.resume_at:
            return None
        return Fault.UNREACHABLE if code == 200 or code >= 500 else Fault.LIED
    if code in (200, 206) and expected.limit is not None and (length or 0) > expected.limit:
        return Fault.LIED
    if expected.size is not None and length is not None:
        if code == 200 and length != expected.size:
            return Fault.LIED
        if code == 206 and _range_start(response) + length > expected.size:
            return Fault.LIED
    if code == 200:
        return None if length is not None else Fault.UNREACHABLE
    if code == 206:
        usable = expected.ranged and length is not None and _range_start(response) >= 0
        return None if usable else Fault.LIED
    if code == 400 or (code == 416 and expected.ranged):
        small = response.length is not UNKNOWN_LENGTH and response.length <= SMALL_BODY
        return None if method == "HEAD" or small else Fault.UNREACHABLE
    return Fault.UNREACHABLE


MAX_EXPECTED_SIZES = 100_000
"""Content sizes remembered from verified manifests: far more than the layers of the
images a node pulls between two restarts, at about 200 bytes each."""


class ExpectedSizes:
    """The size of each piece of content, as the verified manifests that passed through
    this node give it: a peer that declares another length for a blob is lying, and
    is cut off before a byte goes to the client (least recently learned forgotten
    first)."""

    def __init__(self, capacity: int = MAX_EXPECTED_SIZES) -> None:
        self._capacity = capacity
        self._sizes: OrderedDict[str, int] = OrderedDict()

    def learn(self, descriptors: list[Descriptor]) -> None:
        for descriptor in descriptors:
            if descriptor.size >= 0:
                self._sizes[descriptor.digest] = descriptor.size
                self._sizes.move_to_end(descriptor.digest)
        while len(self._sizes) > self._capacity:
            self._sizes.popitem(last=False)

    def get(self, digest: str) -> int | None:
        return self._sizes.get(digest)


class _KeptHash:
    """A SHA-256 that keeps what it hashed: a manifest, at most MAX_MANIFEST_SIZE."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._parts: list[bytes] = []

    def update(self, data: bytes) -> None:
        self._hash.update(data)
        self._parts.append(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def data(self) -> bytes:
        return b"".join(self._parts)


def _declared_length(response: Any, method: str) -> int | None:
    """The body length a response declares; a HEAD's is in its ``Content-Length``."""
    if method != "HEAD":
        return None if response.length is UNKNOWN_LENGTH else int(response.length)
    value = _header(response, b"content-length")
    return int(value) if value is not None and value.isdigit() and len(value) < 19 else None


def peer_url(peer: Peer, path: str) -> str:
    return f"http://{Address(*peer)}{path}"


def request_peer(
    clock: Any,
    client: Any,
    method: str,
    url: str,
    headers: dict[bytes, list[bytes]],
    timeout: float,
) -> Deferred[Any]:
    """A streamed request whose response headers must arrive within ``timeout`` seconds,
    or it fails with PeerTimedOut; cancelling it otherwise still means CancelledError."""
    attempt: Deferred[Any] = client.request(method, url, headers=headers, unbuffered=True)
    timer = clock.callLater(timeout, attempt.cancel)

    def settled(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        elif isinstance(result, Failure) and result.check(CancelledError):
            return Failure(PeerTimedOut(f"no response headers within {timeout:g} s"))
        return result

    return attempt.addBoth(settled)


def _header(response: Any, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def _range_start(response: Any) -> int:
    """Where a 206 body starts in the content; 0 for a whole body; -1 when its
    ``Content-Range`` is missing or does not hold exactly the bytes it sends."""
    if response.code != 206:
        return 0
    held = content_range(_header(response, b"content-range"))
    if held is None or held.length != response.length:
        return -1
    return held.first


SMALL_BODY = 64 * 1024
"""Unwanted bodies up to this size are read to the end, keeping the connection for reuse."""


class _Discard(Protocol):
    """Takes a body nobody wants: reads a small one, cuts a large or unknown one off."""

    def __init__(self, read: bool) -> None:
        self._read = read

    def connectionMade(self) -> None:
        if not self._read and self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()


def _discard(response: Any) -> None:
    small = response.length is not UNKNOWN_LENGTH and response.length <= SMALL_BODY
    response.deliverBody(_Discard(read=small))
