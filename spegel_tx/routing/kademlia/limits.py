"""What the DHT lets any one address cost this node: every limit against strangers in
one place.

Without a cluster secret anyone who can send a UDP datagram to a node is a peer.
These bounds keep what such a stranger can do small and constant: how many routing
table slots and records one address holds, how many bytes this node sends
beyond what it received, and how much it checks at once on a stranger's word.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime


@dataclass(frozen=True)
class Limits:
    contacts_per_host: int = 2
    """Routing table contacts (and a search's candidates) at one IP address. One node
    runs per address; the second slot lets a node restarted with a new id come back
    before its old id has been found dead."""
    records: int = 200_000
    """Provider records kept for all addresses together (``router-max-records``). A
    record takes about 480 bytes, so 200,000 take about 95 MB; a node stores some 20
    records per key it is among the nearest to, or, in a cluster of 20 nodes or fewer,
    one per key each other node holds."""
    records_per_host: int = 25_000
    """Provider records kept for one address (``router-max-records-per-host``): more
    keys than a node advertises (bench/dht.py places 10,000 from one node)."""
    answer_burst: int = 128 * 1024
    """Bytes of answers beyond the requests' own bytes one address may draw at once:
    over a hundred full answers, more than a pull's lookups ask of one node."""
    answer_rate: int = 16 * 1024
    """Bytes per second that allowance refills."""
    answer_burst_total: int = 1024 * 1024
    answer_rate_total: int = 256 * 1024
    """The same for all addresses together, for a stranger who forges many sources."""
    checks_in_flight: int = 64
    """Pings out at once to verify a claim: one per request from an unknown address
    would let forged sources make the node ping whoever they name."""


DEFAULT_LIMITS = Limits()


class ByteBudget:
    """A token bucket of bytes per address, refilled at ``rate`` per second up to
    ``burst``, with a bounded number of addresses remembered (a forgotten one starts
    full again, as a new one does)."""

    def __init__(
        self, clock: IReactorTime, rate: float, burst: float, addresses: int = 16384
    ) -> None:
        self._clock = clock
        self._rate = rate
        self._burst = burst
        self._addresses = addresses
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def available(self, address: str) -> float:
        now = self._clock.seconds()
        tokens, since = self._buckets.get(address, (self._burst, now))
        return min(self._burst, tokens + (now - since) * self._rate)

    def take(self, address: str, wanted: float) -> float:
        """Take up to ``wanted`` bytes; returns how many were granted."""
        available = self.available(address)
        granted = min(wanted, available)
        self._buckets[address] = (available - granted, self._clock.seconds())
        self._buckets.move_to_end(address)
        while len(self._buckets) > self._addresses:
            self._buckets.popitem(last=False)
        return granted
