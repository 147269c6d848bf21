"""``IRouter`` on the Kademlia DHT: join, advertise, withdraw, republish, look up."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from spegel_tx.interfaces import IBootstrapper, ILookup, IRouter
from spegel_tx.routing.kademlia.codec import split_keys
from spegel_tx.routing.kademlia.lookup import ProviderLookup, Search
from spegel_tx.routing.kademlia.messages import AddProvider, Contact, RemoveProvider
from spegel_tx.routing.kademlia.node import key_id
from spegel_tx.routing.kademlia.placement import place
from spegel_tx.routing.kademlia.protocol import (
    AnsweredByAnother,
    KademliaProtocol,
    RequestTimeout,
    RequestUnsendable,
)

_log = Logger()


STORES_IN_FLIGHT = 32
"""AddProvider requests outstanding at once: advertising 10,000 keys at once lost
nearly half its records to full socket buffers over real UDP (bench/dht.py)."""

STORE_ATTEMPTS = 2


def _node_id(contact: Contact) -> bytes:
    return contact.node_id


@implementer(IRouter)
class KademliaRouter(Service):
    """Owns the protocol's periodic work; the UDP port is listened on by the caller's service."""

    def __init__(
        self,
        clock: Any,
        protocol: KademliaProtocol,
        bootstrapper: IBootstrapper,
        router_port: int,
        republish_interval: float = 15 * 60.0,
        bootstrap_interval: float = 60.0,
        refresh_interval: float = 15 * 60.0,
        max_bootstrap_delay: float = 30.0,
    ) -> None:
        self._clock = clock
        self.protocol = protocol
        self._bootstrapper = bootstrapper
        self._router_port = router_port
        self._republish_interval = republish_interval
        self._bootstrap_interval = bootstrap_interval
        self._refresh_interval = refresh_interval
        self._max_bootstrap_delay = max_bootstrap_delay
        self._bootstrap_delay = 0.5
        self._unreachable_logged = False
        self._joined = False
        self._advertised: set[str] = set()
        self._stored_at: dict[bytes, set[Contact]] = {}
        self._searches: dict[bytes, Search] = {}
        self._loops: list[LoopingCall] = []
        self._bootstrap_call: Any = None
        self._peer_wait: Deferred[None] | None = None

    # Lifecycle

    def startService(self) -> None:
        Service.startService(self)
        if self.protocol.secret is None:
            _log.warn(
                "the DHT runs without a cluster secret (router-secret-file): anyone who can "
                "send this node a UDP datagram can join the DHT, advertise content under "
                "any digest or tag, and sit in lookups; set the same secret on every node"
            )
        for work, interval in [
            (self._republish, self._republish_interval),
            (self._maintain, 60.0),
            (self._refresh, self._refresh_interval),
        ]:
            loop = LoopingCall(self._guarded, work)
            loop.clock = self._clock
            loop.start(interval, now=False)
            self._loops.append(loop)
        self._bootstrap_call = self._clock.callLater(0, self._bootstrap)

    def stopService(self) -> Deferred[None]:
        """Withdraw everything first, so peers stop sending requests to a node that left."""
        Service.stopService(self)
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        if self._bootstrap_call is not None and self._bootstrap_call.active():
            self._bootstrap_call.cancel()
        self._stop_waiting_for_peer()
        return self.withdraw(sorted(self._advertised))

    def _guarded(self, work: Any) -> Deferred[None]:
        """Periodic work logs its failures; a LoopingCall whose work fails stops for good."""
        d: Deferred[None] = Deferred.fromCoroutine(work())
        d.addErrback(lambda f: _log.failure("DHT maintenance failed", f))
        return d

    # Joining

    def ready(self) -> bool:
        return len(self.protocol.table) > 0

    def _bootstrap(self) -> None:
        self._bootstrap_call = None
        self._stop_waiting_for_peer()
        Deferred.fromCoroutine(self._join()).addErrback(
            lambda f: _log.failure("DHT bootstrap failed", f)
        ).addBoth(lambda _: self._schedule_bootstrap())

    def _schedule_bootstrap(self) -> None:
        if not self.running:
            return
        if self.ready():
            self._bootstrap_delay = 0.5
            delay = self._bootstrap_interval
        else:
            delay = self._bootstrap_delay
            self._bootstrap_delay = min(self._bootstrap_delay * 2, self._max_bootstrap_delay)
            # A peer may find us first (we started alone, or before it): join at once,
            # so what we advertised meanwhile is placed now, not at the next attempt.
            self._peer_wait = self.protocol.peer_known()
            self._peer_wait.addCallbacks(self._peer_appeared, lambda f: f.trap(CancelledError))
        self._bootstrap_call = self._clock.callLater(delay, self._bootstrap)

    def _peer_appeared(self, _: None) -> None:
        self._peer_wait = None
        if self._bootstrap_call is not None and self._bootstrap_call.active():
            self._bootstrap_call.reset(0)

    def _stop_waiting_for_peer(self) -> None:
        waiting, self._peer_wait = self._peer_wait, None
        if waiting is not None:
            waiting.cancel()

    async def _join(self) -> None:
        if not self.ready():
            # Nothing known (first start, or every contact failed): a full join again.
            # Not derivable from ready() at the next join: a peer that contacts us in
            # between fills the table without our having searched or placed anything.
            self._joined = False
        peers = await self._bootstrapper.peers()
        others = [
            (host, port)
            for host, port in peers
            if (host, port) not in self.protocol.own_addresses
            and (host, port) != self._own_address()
        ]
        pings = [self.protocol.ping(Contact(b"", host, port)) for host, port in others]
        await DeferredList(pings, consumeErrors=True)
        if not self.running:
            return
        if self.ready():
            self._unreachable_logged = False
            await Search(self.protocol, self.protocol.node_id, False, 0).start()
            if not self._joined:
                self._joined = True
                await self._fill_far_buckets()
                if self._advertised:
                    # Advertised while no peer was known, those records went nowhere.
                    await self._provide(sorted(self._advertised))
            return
        # Our own ping, sent to an address we did not yet know as ours, is no failure.
        unanswered = [address for address in others if address not in self.protocol.own_addresses]
        if unanswered and not self._unreachable_logged:
            # Once per streak: the backoff retries quietly until a peer answers.
            self._unreachable_logged = True
            _log.warn(
                "no DHT peer answered among {count} bootstrap peers; retrying",
                count=len(unanswered),
            )

    async def _fill_far_buckets(self) -> None:
        """Search once in every bucket farther than our closest neighbour (Kademlia's join).

        The search for our own id only meets nodes near us, and nodes elsewhere never
        contact us by themselves: without this a new node knows nothing of the far half
        of the id space (its busiest bucket) until the periodic refresh, so it cannot
        find, nor place, keys there. In a 200-node simulation one key in five was
        stored on the wrong nodes.
        """
        table = self.protocol.table
        nearest = table.closest(table.own_id, 1)
        if not nearest:
            return
        searches = [
            Search(self.protocol, table.random_id_in(index), False, 0).start()
            for index in range(table.bucket_index(nearest[0].node_id))
        ]
        await DeferredList(searches, consumeErrors=True)

    def _own_address(self) -> tuple[str, int] | None:
        host = getattr(self.protocol.transport, "getHost", lambda: None)()
        return (host.host, host.port) if host is not None else None

    # Looking up

    def lookup(self, key: str, count: int) -> ILookup:
        target = key_id(key)
        search = self._searches.get(target)
        if search is None or search.done:
            search = Search(self.protocol, target, find_providers=True, want=count)
            self._searches[target] = search
            search.start().addBoth(lambda _: self._searches.pop(target, None))
        else:
            search.want = max(search.want, count)
        return ProviderLookup(search, count)

    # Advertising

    def advertise(self, keys: Iterable[str]) -> Deferred[None]:
        keys = list(keys)
        self._advertised.update(keys)
        return Deferred.fromCoroutine(self._provide(keys))

    async def _provide(self, keys: list[str]) -> None:
        """Place every key on its k closest nodes, then tell each node all its keys in
        few datagrams."""
        closest = await place([key_id(key) for key in keys], self._closest_nodes, self.protocol.k)
        by_contact: dict[Contact, list[bytes]] = defaultdict(list)
        for target, contacts in closest.items():
            for contact in contacts:
                by_contact[contact].append(target)
            self._stored_at.setdefault(target, set()).update(contacts)
        batches = iter(
            [
                (contact, batch)
                for contact, targets_of_contact in by_contact.items()
                for batch in split_keys(targets_of_contact)
            ]
        )

        async def sender() -> None:
            # A loop per sender rather than a semaphore's callbacks: stores that fail at
            # once (the socket closed at stop) follow one another instead of nesting.
            for contact, batch in batches:
                await self._store(contact, batch)

        senders = [Deferred.fromCoroutine(sender()) for _ in range(STORES_IN_FLIGHT)]
        await DeferredList(senders, consumeErrors=True)

    async def _store(self, contact: Contact, batch: tuple[bytes, ...]) -> None:
        """One AddProvider, tried twice: in a burst a lost datagram is likelier than a
        dead node, so a timeout neither evicts the node nor gives up at once."""
        for attempt in range(STORE_ATTEMPTS):
            try:
                await self.protocol.request(contact, AddProvider(batch), evicts=False)
                return
            except RequestTimeout:
                if attempt == STORE_ATTEMPTS - 1:
                    self.protocol.counters["stores_lost"] += 1
            except (RequestUnsendable, AnsweredByAnother):
                self.protocol.counters["stores_lost"] += 1
                return

    def _closest_nodes(self, target: bytes) -> Deferred[list[Contact]]:
        return Search(self.protocol, target, find_providers=False, want=0).start()

    def withdraw(self, keys: Iterable[str]) -> Deferred[None]:
        by_contact: dict[Contact, list[bytes]] = defaultdict(list)
        for key in keys:
            self._advertised.discard(key)
            target = key_id(key)
            # Sorted, not in set order (which varies with the hash seed): a simulation
            # with packet loss must drop the same datagrams on every run.
            for contact in sorted(self._stored_at.pop(target, ()), key=_node_id):
                by_contact[contact].append(target)
        sends = [
            self.protocol.request(contact, RemoveProvider(batch))
            for contact, targets in by_contact.items()
            for batch in split_keys(targets)
        ]
        return DeferredList(sends, consumeErrors=True).addCallback(lambda _: None)

    # Periodic work

    async def _republish(self) -> None:
        if self._advertised:
            await self._provide(sorted(self._advertised))

    async def _maintain(self) -> None:
        self.protocol.records.expire()

    async def _refresh(self) -> None:
        now = self._clock.seconds()
        for target in self.protocol.table.stale_buckets(now, self._refresh_interval):
            await Search(self.protocol, target, find_providers=False, want=0).start()
