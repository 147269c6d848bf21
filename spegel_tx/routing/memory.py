"""An ``IRouter`` shared by nodes in one process: what the DHT must behave like, without UDP."""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from spegel_tx.interfaces import ILookup, IRouter


class MemoryRoutingTable:
    """Who holds which key, for every MemoryRouter made from it."""

    def __init__(self) -> None:
        self.holders: dict[str, dict[tuple[str, int], None]] = {}
        self.members: set[tuple[str, int]] = set()

    def router(self, host: str, registry_port: int) -> MemoryRouter:
        self.members.add((host, registry_port))
        return MemoryRouter(self, (host, registry_port))


@implementer(IRouter)
class MemoryRouter:
    def __init__(self, table: MemoryRoutingTable, address: tuple[str, int]) -> None:
        self._table = table
        self.address = address

    def ready(self) -> bool:
        return len(self._table.members - {self.address}) > 0

    def lookup(self, key: str, count: int) -> ILookup:
        holders = [a for a in self._table.holders.get(key, {}) if a != self.address]
        return _ListLookup(holders[:count])

    def advertise(self, keys: Iterable[str]) -> Deferred[None]:
        for key in keys:
            self._table.holders.setdefault(key, {})[self.address] = None
        return succeed(None)

    def withdraw(self, keys: Iterable[str]) -> Deferred[None]:
        for key in keys:
            self._table.holders.get(key, {}).pop(self.address, None)
        return succeed(None)


@implementer(ILookup)
class _ListLookup:
    def __init__(self, providers: list[tuple[str, int]]) -> None:
        self._providers = providers

    def next_provider(self) -> Deferred[tuple[str, int] | None]:
        return succeed(self._providers.pop(0) if self._providers else None)

    def cancel(self) -> None:
        self._providers.clear()

    def answering(self) -> bool:
        return False
