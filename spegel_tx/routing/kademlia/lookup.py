"""Iterative Kademlia lookups: ask the alpha closest unasked nodes, learn closer ones, repeat.

A search for providers streams each provider the moment a response names
it, so the mirror can start fetching while the search goes on. Searches for
the same key share one set of datagrams however many callers wait on it.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from spegel_tx.interfaces import ILookup
from spegel_tx.routing.kademlia.messages import (
    Body,
    Contact,
    FindNode,
    GetProviders,
    Message,
    Nodes,
    Provider,
    Providers,
)
from spegel_tx.routing.kademlia.node import distance
from spegel_tx.routing.kademlia.protocol import KademliaProtocol


class Search:
    """One iterative search towards ``target``; ``providers`` grows as they are found.

    ``want`` is how many providers end the search early (0: never; a node
    search runs until the closest ``k`` have answered or failed).
    """

    def __init__(
        self,
        protocol: KademliaProtocol,
        target: bytes,
        find_providers: bool,
        want: int,
        alpha: int = 3,
    ) -> None:
        self._protocol = protocol
        self.target = target
        self._find_providers = find_providers
        self.want = want
        self._alpha = alpha
        self._candidates: dict[bytes, Contact] = {}
        self._distances: dict[bytes, int] = {}
        self._ranked: list[tuple[int, bytes]] = []
        """Candidates nearest first, kept in order as they come: every answer reads the
        first k, and an answer names up to 20 (most of them already known)."""
        self._asked: set[bytes] = set()
        self._answered: dict[bytes, Contact] = {}
        self._in_flight = 0
        self._per_host: Counter[str] = Counter()
        """Candidates taken from each address, failed ones included."""
        self.providers: list[Provider] = []
        self._provider_addresses: set[tuple[str, int]] = set()
        self.done = False
        self.messages = 0
        self._listeners: list[Callable[[], None]] = []
        self._finished: Deferred[list[Contact]] = Deferred()

    def start(self) -> Deferred[list[Contact]]:
        protocol = self._protocol
        protocol.table.touch(self.target, protocol.clock.seconds())
        if self._find_providers:
            for provider in protocol.records.providers_of(self.target):
                self._found(provider)
        for contact in protocol.table.closest(self.target, protocol.k):
            self._add_candidate(contact)
        self._step()
        return self._finished

    @property
    def awaiting(self) -> bool:
        """Requests are out whose answers have neither come nor timed out."""
        return not self.done and self._in_flight > 0

    def listen(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a provider is found or the search ends."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    def _found(self, provider: Provider) -> None:
        """A provider, once per address: an address that answers under many ids is
        still one node."""
        address = (provider.host, provider.registry_port)
        if provider.node_id == self._protocol.node_id or address in self._provider_addresses:
            return
        self._provider_addresses.add(address)
        self.providers.append(provider)
        self._notify()

    def _add_candidate(self, contact: Contact) -> bool:
        """Whether ``contact`` is new to this search.

        Not one that already failed: named again by a node that has not noticed it is
        gone, it would take the place of a live one among the k closest. An id the
        routing table holds is asked where the table has it, whatever address an
        answer names; and few candidates come from any one address, so that a
        stranger's made-up ids near the target cannot crowd out the real nodes.
        """
        node_id = contact.node_id
        if node_id in self._candidates or node_id in self._asked:
            return False
        contact = self._protocol.table.get(node_id) or contact
        if self._per_host[contact.host] >= self._protocol.limits.contacts_per_host:
            return False
        self._per_host[contact.host] += 1
        away = distance(node_id, self.target)
        self._candidates[node_id] = contact
        self._distances[node_id] = away
        bisect.insort(self._ranked, (away, node_id))
        return True

    def _distance(self, contact: Contact) -> int:
        return self._distances[contact.node_id]

    def _closest_unfinished(self) -> list[Contact]:
        """The k closest known contacts that have not failed, nearest first."""
        return [self._candidates[node_id] for _, node_id in self._ranked[: self._protocol.k]]

    def _step(self) -> None:
        if self.done:
            return
        if self.want and len(self.providers) >= self.want:
            self._finish()
            return
        closest = self._closest_unfinished()
        for contact in closest:
            if self._in_flight >= self._alpha:
                break
            if contact.node_id in self._asked:
                continue
            self._asked.add(contact.node_id)
            self._in_flight += 1
            self.messages += 1
            body: Body = (
                GetProviders(self.target) if self._find_providers else FindNode(self.target)
            )
            self._protocol.request(contact, body).addCallbacks(
                self._answered_by, self._failed_by, callbackArgs=(contact,), errbackArgs=(contact,)
            )
        if self._in_flight == 0 and all(c.node_id in self._asked for c in closest):
            self._finish()

    def _answered_by(self, message: Message, contact: Contact) -> None:
        self._in_flight -= 1
        if self.done:
            return
        self._answered[contact.node_id] = contact
        body = message.body
        closer: tuple[Contact, ...] = ()
        if isinstance(body, Providers):
            for provider in body.providers:
                self._found(provider)
            closer = body.closer
        elif isinstance(body, Nodes):
            closer = body.contacts
        for candidate in closer:
            if candidate.node_id != self._protocol.node_id and self._add_candidate(candidate):
                self._protocol.heard_of(candidate)
        self._step()

    def _failed_by(self, failure: Failure, contact: Contact) -> None:
        self._in_flight -= 1
        if self._candidates.pop(contact.node_id, None) is not None:
            place = (self._distances[contact.node_id], contact.node_id)
            del self._ranked[bisect.bisect_left(self._ranked, place)]
        self._step()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        answered = sorted(self._answered.values(), key=self._distance)
        self._finished.callback(answered[: self._protocol.k])
        self._notify()

    def cancel(self) -> None:
        self._finish()


@implementer(ILookup)
class ProviderLookup:
    """One caller's view of a shared provider search: its own position in the results."""

    def __init__(self, search: Search, count: int) -> None:
        self._search = search
        self._count = count
        self._position = 0
        self._waiting: Deferred[tuple[str, int] | None] | None = None
        self._cancelled = False
        search.listen(self._changed)

    def next_provider(self) -> Deferred[tuple[str, int] | None]:
        if self._position < min(len(self._search.providers), self._count) and not self._cancelled:
            provider = self._search.providers[self._position]
            self._position += 1
            return succeed((provider.host, provider.registry_port))
        if self._cancelled or self._search.done or self._position >= self._count:
            return succeed(None)
        self._waiting = Deferred()
        return self._waiting

    def _changed(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self.next_provider().chainDeferred(waiting)

    def cancel(self) -> None:
        self._cancelled = True
        self._changed()

    def answering(self) -> bool:
        return not self._cancelled and self._search.awaiting
