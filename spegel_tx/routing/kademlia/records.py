"""The provider records a node keeps for others: one per key and source address, bounded
in number per source and overall, so no flood can grow a node's memory.

A record belongs to the address its AddProvider came from, not to the node id the
datagram claims: a stranger who draws a new id for every datagram still holds one
record per key, and at most ``max_per_source`` in all. When the store is full, a new
record takes the place of the oldest record of the source holding the most: a
flooding source pays for its own records, and a node that advertises a normal
amount keeps its records while strangers fill the rest.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from spegel_tx.routing.kademlia.limits import Limits
from spegel_tx.routing.kademlia.messages import Provider


@dataclass(frozen=True)
class StoreOutcome:
    """What ``ProviderRecords.store`` did with one record."""

    stored: bool
    evicted: bool = False
    """A record of the largest source made room."""


_STORED = StoreOutcome(True)
_REFUSED = StoreOutcome(False)
_EVICTED = StoreOutcome(True, evicted=True)


class _Source:
    """One address's records, oldest (by last refresh, hence by expiry) first."""

    __slots__ = ("expiries", "provider")

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.expiries: OrderedDict[bytes, float] = OrderedDict()


class ProviderRecords:
    """Keys to the addresses that provide them, each record expiring ``ttl`` after its
    last AddProvider."""

    def __init__(
        self,
        clock: IReactorTime,
        ttl: float = 19 * 60.0,
        max_records: int = Limits.records,
        max_per_source: int = Limits.records_per_host,
    ) -> None:
        self._clock = clock
        self.ttl = ttl
        self.max_records = max_records
        self.max_per_source = max_per_source
        self._by_key: dict[bytes, dict[str, _Source]] = {}
        self._sources: dict[str, _Source] = {}
        self._count = 0
        self._ranks: dict[int, set[str]] = {}
        """Sources by how many records each holds, to find the largest at once."""
        self._largest = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[bytes]:
        """The keys that have records."""
        return iter(self._by_key)

    def store(self, key: bytes, provider: Provider) -> StoreOutcome:
        """Record (or refresh) ``provider`` for ``key``; its host is the record's owner.

        The provider's id and registry port are the latest the address stated.
        """
        host = provider.host
        expires = self._clock.seconds() + self.ttl
        source = self._sources.get(host)
        if source is not None and key in source.expiries:
            source.provider = provider
            source.expiries[key] = expires
            source.expiries.move_to_end(key)
            return _STORED
        outcome = _STORED
        held = len(source.expiries) if source is not None else 0
        if held >= self.max_per_source:
            self._drop_oldest(host)
        elif self._count >= self.max_records:
            if self._largest > held + 1:
                self._drop_oldest(next(iter(self._ranks[self._largest])))
                outcome = _EVICTED
            elif held and held == self._largest:
                self._drop_oldest(host)
            else:
                # Every source holds about as many as this one: nobody's to take.
                return _REFUSED
        source = self._sources.get(host)
        if source is None:
            source = self._sources[host] = _Source(provider)
        source.provider = provider
        source.expiries[key] = expires
        self._by_key.setdefault(key, {})[host] = source
        self._count += 1
        self._rank(host, len(source.expiries) - 1, len(source.expiries))
        return outcome

    def remove(self, key: bytes, host: str) -> None:
        """The record of ``host`` for ``key`` goes (a RemoveProvider from that address)."""
        source = self._sources.get(host)
        if source is None or key not in source.expiries:
            return
        del source.expiries[key]
        self._removed(key, host, source)

    def providers_of(self, key: bytes) -> list[Provider]:
        now = self._clock.seconds()
        holders = self._by_key.get(key, {})
        return [source.provider for source in holders.values() if source.expiries[key] > now]

    def expire(self) -> int:
        """Drop expired records; returns how many went. Each source's records are
        oldest first, so only the expired ones and one more per source are looked at."""
        now = self._clock.seconds()
        removed = 0
        for host, source in list(self._sources.items()):
            expiries = source.expiries
            while expiries:
                key, expires = next(iter(expiries.items()))
                if expires > now:
                    break
                self.remove(key, host)
                removed += 1
        return removed

    def sources(self) -> int:
        return len(self._sources)

    # Bookkeeping

    def _drop_oldest(self, host: str) -> None:
        source = self._sources[host]
        key, _ = source.expiries.popitem(last=False)
        self._removed(key, host, source)

    def _removed(self, key: bytes, host: str, source: _Source) -> None:
        holders = self._by_key[key]
        del holders[host]
        if not holders:
            del self._by_key[key]
        self._count -= 1
        self._rank(host, len(source.expiries) + 1, len(source.expiries))
        if not source.expiries:
            del self._sources[host]

    def _rank(self, host: str, before: int, after: int) -> None:
        """Move ``host`` from the sources holding ``before`` records to those holding
        ``after`` (0: none)."""
        if before:
            ranked = self._ranks[before]
            ranked.discard(host)
            if not ranked:
                del self._ranks[before]
        if after:
            self._ranks.setdefault(after, set()).add(host)
            self._largest = max(self._largest, after)
        while self._largest and self._largest not in self._ranks:
            self._largest -= 1
