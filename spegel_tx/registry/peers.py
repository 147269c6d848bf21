"""Peer choice in one place: the order providers are tried in, what a failure says
about the peer that had it, and when the peer is forgiven.

A DHT record outlives the node that published it by up to its TTL (19 minutes),
so a crashed node keeps being named as a provider; remembering that it refused
spares later requests the same wait. But in a cluster peers restart all the
time, so what is remembered only orders the providers: a quarantined peer is
tried after the others, never left out while it is the only one left.

Evidence comes in kinds:

- content, a 404 or a client's own bad request (400, 416) come from a peer that
  is alive: a 404 is about one key on that peer, a 400 or 416 about nobody;
- a refused connection, a timeout, a body broken off or a 5xx make the peer
  *suspect* until it is seen alive again (it answers, or its router speaks)
  or the quarantine passes; a body under the throughput floor does too, but
  only the quarantine's end forgives it (a trickling peer is alive);
- content that fails its digest, or a partial answer nobody asked for, make it
  *distrusted* for the digest quarantine, whatever it says meanwhile.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from spegel_tx.interfaces import ILookup

Peer = tuple[str, int]
"""A peer's registry: ``(host, port)``."""

LATENCY_SAMPLES = 64
"""Recent time-to-headers samples the hedge delay is learned from."""

DEFAULT_HEDGE_DELAY = 0.1
"""Seconds before a second provider is tried, until enough samples are in."""

MIN_HEDGE_DELAY = 0.01
MAX_HEDGE_DELAY = 1.0

MAX_BAD_COPIES = 10_000
"""Bad copies remembered, each a peer and a digest (the oldest forgotten first)."""

MAX_RESOLVE_WAIT = 1.0
"""However slow the DHT is now, a lookup idle this long is over."""


class Fault(enum.Enum):
    UNREACHABLE = "unreachable"
    """Refused, timed out, broke off or failed inside: forgiven once seen alive."""
    SLOW = "slow"
    """Sent under the throughput floor: alive, so only the quarantine's end forgives it."""
    LIED = "lied"
    """Sent what it must not: forgiven only when the digest quarantine ends."""


class PeerHealth:
    def __init__(self, clock: Any, quarantine: float = 30.0, distrust: float = 600.0) -> None:
        self._clock = clock
        self.quarantine_seconds = quarantine
        self.distrust_seconds = distrust
        self._suspect: dict[Peer, float] = {}
        self._distrusted: dict[Peer, float] = {}
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._resolve_times: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._bad_copies: OrderedDict[tuple[Peer, str], float] = OrderedDict()

    def bad_copy(self, peer: Peer, digest: str) -> None:
        """``peer`` sent content that does not hash to ``digest``: its copy is bad (a
        corrupt disk, or a lie), and it is not asked for that digest again until the
        digest quarantine ends, even when no other peer holds it."""
        self._bad_copies[(peer, digest)] = self._clock.seconds() + self.distrust_seconds
        self._bad_copies.move_to_end((peer, digest))
        while len(self._bad_copies) > MAX_BAD_COPIES:
            self._bad_copies.popitem(last=False)

    def has_bad_copy(self, peer: Peer, digest: str) -> bool:
        until = self._bad_copies.get((peer, digest))
        if until is None:
            return False
        if until <= self._clock.seconds():
            del self._bad_copies[(peer, digest)]
            return False
        return True

    def charge(self, peer: Peer, fault: Fault) -> None:
        book, seconds = self._book(fault)
        until = self._clock.seconds() + seconds
        book[peer] = max(until, book.get(peer, 0.0))

    def _book(self, fault: Fault) -> tuple[dict[Peer, float], float]:
        if fault is Fault.LIED:
            return self._distrusted, self.distrust_seconds
        if fault is Fault.SLOW:
            return self._distrusted, self.quarantine_seconds
        return self._suspect, self.quarantine_seconds

    def alive(self, peer: Peer) -> None:
        """``peer`` answered, or its router spoke: it is not down (it may still lie)."""
        self._suspect.pop(peer, None)

    def quarantined(self, peer: Peer) -> bool:
        return _holds(self._suspect, peer, self._clock.seconds()) or _holds(
            self._distrusted, peer, self._clock.seconds()
        )

    def quarantined_peers(self) -> list[Peer]:
        return [peer for peer in {**self._suspect, **self._distrusted} if self.quarantined(peer)]

    def answered(self, seconds: float) -> None:
        """A peer sent response headers ``seconds`` after the request left."""
        self._latencies.append(seconds)

    def resolved(self, seconds: float) -> None:
        """A lookup named its first provider ``seconds`` after it started."""
        self._resolve_times.append(seconds)

    def resolve_wait(self, minimum: float) -> float:
        """How long a lookup may stay idle: ``minimum`` (mirror-resolve-timeout), or twice
        the 90th percentile of recent times to a first provider when the DHT is slower
        than that now. A node that is busy, or whose peers are, answers later; a fixed
        budget would then call content that peers hold missing."""
        if not self._resolve_times:
            return minimum
        ordered = sorted(self._resolve_times)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        return min(MAX_RESOLVE_WAIT, max(minimum, 2 * p90))

    def hedge_delay(self) -> float:
        """Twice the 90th percentile of recent times to headers: a provider slower than
        that is likely stuck, and a second one is started beside it."""
        if len(self._latencies) < 8:
            return DEFAULT_HEDGE_DELAY
        ordered = sorted(self._latencies)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        return min(MAX_HEDGE_DELAY, max(MIN_HEDGE_DELAY, 2 * p90))


def _holds(book: dict[Peer, float], peer: Peer, now: float) -> bool:
    until = book.get(peer)
    if until is None:
        return False
    if until <= now:
        del book[peer]
        return False
    return True


class Providers:
    """The providers of one key for one forwarded request, as the lookup streams them.

    Waiting for the next one gives up after ``resolve_timeout`` without ending
    the lookup: a provider that turns up later, or one whose attempt was only
    cancelled because another answered first, is still there for a resume.
    Quarantined providers come last, after the lookup has had its chance to
    name a healthy one.
    """

    def __init__(
        self,
        clock: Any,
        lookup: ILookup,
        health: PeerHealth,
        retries: int,
        resolve_timeout: float,
        counters: dict[str, int],
        resolved: Callable[[float], None],
        key: str = "",
    ) -> None:
        """``key``: providers with a bad copy of it are left out."""
        self._clock = clock
        self._key = key
        self._lookup = lookup
        self._health = health
        self._retries = retries
        self._resolve_timeout = resolve_timeout
        self._counters = counters
        self._resolved = resolved
        self._started = clock.seconds()
        self._found: list[Peer] = []
        self._unused: list[Peer] = []
        self._attempts = 0
        self._asking = False
        self._exhausted = False
        self._waiter: Deferred[None] | None = None
        self._last_turn: Any = None

    def give_back(self, peer: Peer) -> None:
        """``peer``'s attempt was only cancelled: it may be asked again."""
        self._attempts -= 1
        self._unused.insert(0, peer)

    def again(self) -> None:
        """Every provider found so far may be tried once more: after a pause, one that
        refused may have restarted."""
        self._attempts = 0
        self._unused = list(self._found)

    async def spare(self) -> Peer | None:
        """A healthy provider not yet tried, to ask for a second opinion; the lookup gets
        ``resolve_timeout`` to name one."""
        if not self._exhausted and not self._unused:
            await self._more()
        return next((p for p in self._unused if not self._health.quarantined(p)), None)

    async def next(self) -> Peer | None:
        """The next provider to try, or None: retries spent, or nobody left to try."""
        if self._attempts >= self._retries:
            return None
        while True:
            healthy = [peer for peer in self._unused if not self._health.quarantined(peer)]
            if healthy:
                return self._take(healthy[0])
            if self._exhausted or not await self._more():
                break
        if not self._unused:
            return None
        self._counters["quarantined_tried"] += 1
        return self._take(self._unused[0])

    def _take(self, peer: Peer) -> Peer:
        self._unused.remove(peer)
        self._attempts += 1
        return peer

    async def _more(self) -> bool:
        """Wait for the lookup to name another provider; False once it has been idle for
        the resolve wait with no node left to answer, or for MAX_RESOLVE_WAIT."""
        known = len(self._found)
        if not self._asking:
            self._asking = True
            self._lookup.next_provider().addCallback(self._on_found)
        started = self._clock.seconds()
        while len(self._found) == known and not self._exhausted:
            waiter = self._waiter = Deferred()
            wait = self._health.resolve_wait(self._resolve_timeout)
            idle = self._clock.callLater(wait, self._idle)
            await waiter
            if idle.active():
                idle.cancel()
            if self._last_turn is not None and self._last_turn.active():
                self._last_turn.cancel()
            if len(self._found) > known or self._exhausted:
                break
            # Nodes that were asked and have not answered may be busy, not gone: under
            # load they answer late, and a 404 would send containerd upstream for nothing.
            waited = self._clock.seconds() - started
            if not self._lookup.answering() or waited >= MAX_RESOLVE_WAIT:
                return False
        return True

    def _idle(self) -> None:
        """The reactor runs due timers before it reads sockets: on a busy node, answers
        may already wait unread when the budget runs out. One more turn reads them."""
        self._last_turn = self._clock.callLater(0, self._wake)

    def _on_found(self, peer: Peer | None) -> None:
        self._asking = False
        if peer is None:
            self._exhausted = True
        elif self._health.has_bad_copy(peer, self._key):
            self._counters["bad_copy_skipped"] += 1
            self._asking = True
            self._lookup.next_provider().addCallback(self._on_found)
            return
        elif peer not in self._found:
            seconds = self._clock.seconds() - self._started
            self._health.resolved(seconds)
            self._resolved(seconds)
            self._found.append(peer)
            self._unused.append(peer)
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)


@implementer(ILookup)
class PreferComplete:
    """The providers of a complete copy first; those of a download in progress once the
    search for complete copies is over. The second search starts only then: most blobs
    are held whole somewhere, and a search that is not needed costs datagrams."""

    def __init__(self, complete: ILookup, downloading: Callable[[], ILookup]) -> None:
        self._complete = complete
        self._start_downloading = downloading
        self._downloading: ILookup | None = None

    def next_provider(self) -> Deferred[Peer | None]:
        if self._downloading is not None:
            return self._downloading.next_provider()
        return self._complete.next_provider().addCallback(self._found)

    def _found(self, peer: Peer | None) -> Peer | Deferred[Peer | None] | None:
        if peer is not None:
            return peer
        if self._downloading is None:
            self._downloading = self._start_downloading()
        return self._downloading.next_provider()

    def cancel(self) -> None:
        self._complete.cancel()
        if self._downloading is not None:
            self._downloading.cancel()

    def answering(self) -> bool:
        current = self._complete if self._downloading is None else self._downloading
        return bool(current.answering())
