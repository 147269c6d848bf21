"""In-memory implementations of the seams, for tests and for running the registry alone."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IUDPTransport
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from spegel_tx.content import Descriptor, Image, ImageEvent, ImageEventKind
from spegel_tx.errors import NotFound
from spegel_tx.interfaces import IBlob, IBootstrapper, IContentStore, ILookup
from spegel_tx.oci.manifest import children, detect_media_type
from spegel_tx.routing.kademlia.protocol import KademliaProtocol
from spegel_tx.routing.kademlia.router import KademliaRouter

OCTET_STREAM = "application/octet-stream"


@implementer(IBlob)
class BytesBlob:
    """A blob held in memory; ``chunk`` caps each read to exercise streaming."""

    def __init__(self, data: bytes, chunk: int = 64 * 1024) -> None:
        self._data = data
        self._chunk = chunk
        self.size = len(data)
        self.closed = False

    def fileno(self) -> None:
        return None

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return succeed(self._data[offset : offset + min(length, self._chunk)])

    def close(self) -> None:
        self.closed = True


@implementer(IBlob)
class ControlledBlob:
    """A blob whose reads complete only when the test says so."""

    size = 3 * 64 * 1024

    def __init__(self) -> None:
        self.reads: list[tuple[int, Deferred[bytes]]] = []
        self.closed = False

    def fileno(self) -> None:
        return None

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.reads.append((offset, d))
        return d

    def close(self) -> None:
        self.closed = True


@implementer(IContentStore)
class MemoryStore:
    """Content and image names in dictionaries; events fire synchronously."""

    def __init__(self, blobs: Iterable[bytes] = (), images: dict[str, str] | None = None) -> None:
        self.blobs: dict[str, bytes] = {}
        self.names: dict[str, str] = {}
        self.opened: list[BytesBlob] = []
        self.is_ready = True
        self._handlers: list[Callable[[ImageEvent], None]] = []
        for data in blobs:
            self.add_blob(data)
        for name, digest in (images or {}).items():
            self.tag(name, digest)

    def add_blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return digest

    def tag(self, name: str, digest: str) -> None:
        kind = ImageEventKind.UPDATE if name in self.names else ImageEventKind.CREATE
        self.names[name] = digest
        self._emit(ImageEvent(kind, name))

    def untag(self, name: str) -> None:
        del self.names[name]
        self._emit(ImageEvent(ImageEventKind.DELETE, name))

    def _emit(self, event: ImageEvent) -> None:
        for handler in list(self._handlers):
            handler(event)

    def _media_type(self, digest: str) -> str:
        return detect_media_type(self.blobs[digest]) or OCTET_STREAM

    def ready(self) -> bool:
        return self.is_ready

    def images(self) -> Deferred[list[Image]]:
        return succeed(
            [Image(name, digest, self._media_type(digest)) for name, digest in self.names.items()]
        )

    def resolve(self, name: str) -> Deferred[str]:
        if name not in self.names:
            return fail(NotFound(name))
        return succeed(self.names[name])

    def descriptor(self, digest: str) -> Deferred[Descriptor]:
        if digest not in self.blobs:
            return fail(NotFound(digest))
        return succeed(Descriptor(digest, self._media_type(digest), len(self.blobs[digest])))

    def open(self, digest: str) -> Deferred[IBlob]:
        if digest not in self.blobs:
            return fail(NotFound(digest))
        blob = BytesBlob(self.blobs[digest])
        self.opened.append(blob)
        return succeed(blob)

    def digests(self, image: Image) -> Deferred[list[str]]:
        found: list[str] = []
        pending = [image.digest]
        while pending:
            digest = pending.pop()
            if digest not in self.blobs or digest in found:
                continue
            found.append(digest)
            pending.extend(child.digest for child in children(self.blobs[digest]))
        return succeed(found)

    def subscribe(self, handler: Callable[[ImageEvent], None]) -> Callable[[], None]:
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler)


class MemoryUDPNetwork:
    """Datagrams between protocols in one process, on one clock, with optional loss.

    Each datagram arrives ``latency`` seconds after it is sent (so clocks, not
    recursion, drive a lookup), unless the loss draw drops it or the
    destination has vanished. With one latency for all, datagrams arrive in the
    order they were sent: one queue and one pending clock call carry them all,
    which keeps a simulation of hundreds of nodes cheap on ``task.Clock``.
    """

    def __init__(
        self, clock: Any, latency: float = 0.001, loss: float = 0.0, seed: int = 0
    ) -> None:
        self.clock = clock
        self.latency = latency
        self.loss = loss
        self._random = random.Random(seed)
        self._endpoints: dict[tuple[str, int], DatagramProtocol] = {}
        self._in_flight: deque[tuple[float, tuple[str, int], bytes, tuple[str, int]]] = deque()
        self._delivery: Any = None
        self.sent = 0

    def attach(
        self, protocol: DatagramProtocol, host: str, port: int, bound_host: str | None = None
    ) -> None:
        """``bound_host`` is what ``getHost`` reports, e.g. ``0.0.0.0`` for a socket on
        every interface, which then does not know ``host`` as its own address."""
        self._endpoints[(host, port)] = protocol
        protocol.makeConnection(_MemoryUDPTransport(self, host, port, bound_host or host))

    def vanish(self, host: str, port: int) -> None:
        """The node goes without a word: nothing it sent or will be sent arrives."""
        self._endpoints.pop((host, port), None)

    def send(self, source: tuple[str, int], data: bytes, destination: tuple[str, int]) -> None:
        self.sent += 1
        if source not in self._endpoints:
            return
        if self.loss and self._random.random() < self.loss:
            return
        self._in_flight.append((self.clock.seconds() + self.latency, source, data, destination))
        if self._delivery is None:
            self._delivery = self.clock.callLater(self.latency, self._deliver)

    def _deliver(self) -> None:
        # ``_delivery`` stays set until the queue is drained, so that the replies sent
        # meanwhile do not schedule calls of their own: one call, not one per reply.
        # A little slack: the clock's own sums may round the due time a hair later.
        now = self.clock.seconds() + 1e-9
        try:
            while self._in_flight and self._in_flight[0][0] <= now:
                _, source, data, destination = self._in_flight.popleft()
                protocol = self._endpoints.get(destination)
                if protocol is not None and source in self._endpoints:
                    protocol.datagramReceived(data, source)
        finally:
            self._delivery = None
            if self._in_flight:
                delay = max(0.0, self._in_flight[0][0] - self.clock.seconds())
                self._delivery = self.clock.callLater(delay, self._deliver)


@implementer(IUDPTransport)
class _MemoryUDPTransport:
    def __init__(self, network: MemoryUDPNetwork, host: str, port: int, bound_host: str) -> None:
        self._network = network
        self._address = (host, port)
        self._bound = (bound_host, port)

    def write(self, packet: bytes, addr: tuple[str, int] | None = None) -> None:
        if addr is None:
            raise ValueError("an unconnected UDP transport needs an address")
        self._network.send(self._address, packet, addr)

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", *self._bound)

    def stopListening(self) -> None:
        self._network.vanish(*self._address)

    def connect(self, host: str, port: int) -> None:
        raise NotImplementedError("the DHT sends to many peers from one unconnected socket")

    def getPeer(self) -> None:
        return None

    def setBroadcastAllowed(self, enabled: bool) -> None:
        pass

    def getBroadcastAllowed(self) -> bool:
        return False


@implementer(IBootstrapper)
class FixedBootstrapper:
    """Always the same peers, at once."""

    def __init__(self, peers: list[tuple[str, int]]) -> None:
        self.addresses = peers

    def peers(self) -> Deferred[list[tuple[str, int]]]:
        return succeed(list(self.addresses))


class _SimulatedCall(DelayedCall):
    """A delayed call that tells its clock when ``reset`` or ``delay`` moves it
    (``DelayedCall`` itself only reports moves to an earlier time)."""

    def __init__(
        self,
        clock: SimulationClock,
        time: float,
        func: Callable[..., object],
        args: tuple[object, ...],
        kw: dict[str, object],
    ) -> None:
        super().__init__(time, func, args, kw, clock._cancelled, clock._moved, clock.seconds)
        self._clock = clock
        self.place = (time, 0)

    def reset(self, seconds_from_now: float) -> None:
        super().reset(seconds_from_now)
        self._clock._moved(self)

    def delay(self, seconds_later: float) -> None:
        super().delay(seconds_later)
        self._clock._moved(self)


class SimulationClock(Clock):
    """``task.Clock``, running the same calls at the same times in the same order, at a
    cost that does not grow with the number pending.

    ``Clock`` keeps ``calls`` in a list that it sorts again (stably, by time) on each
    ``callLater`` and after each call it runs, and finds a cancelled call by comparing
    it with all of them. A cluster of hundreds of nodes keeps thousands of calls pending
    (every node's loops, every request's timeout, many due at the same instant), and
    that was nearly all of a simulation's time. Here the list stays sorted: a new call
    is inserted by bisection after those due at the same time, which is where the
    stable sort puts it, and a cancelled one is found by bisection too, through a
    sorted list of places beside ``calls``. Only when ``reset`` or ``delay`` has moved
    a call is the whole list sorted again, as ``Clock`` would.
    """

    def __init__(self) -> None:
        super().__init__()
        self._places: list[tuple[float, int]] = []
        self._scheduled = itertools.count()
        self._unsorted = False

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> DelayedCall:
        call = _SimulatedCall(self, self.seconds() + delay, callable, args, kw)
        if self._unsorted:
            self.calls.append(call)
            self._sort()
        else:
            call.place = (call.getTime(), next(self._scheduled))
            index = bisect.bisect_right(self._places, call.place)
            self._places.insert(index, call.place)
            self.calls.insert(index, call)
        return call

    def _sort(self) -> None:
        self.calls.sort(key=lambda call: call.getTime())
        self._places = []
        for call in self.calls:
            assert isinstance(call, _SimulatedCall)
            call.place = (call.getTime(), next(self._scheduled))
            self._places.append(call.place)
        self._unsorted = False

    def _cancelled(self, call: DelayedCall) -> None:
        assert isinstance(call, _SimulatedCall)
        # Its place is where it sits, even if it has moved since the last sort.
        index = bisect.bisect_left(self._places, call.place)
        del self._places[index]
        del self.calls[index]

    def _moved(self, call: DelayedCall) -> None:
        self._unsorted = True

    def advance(self, amount: float) -> None:
        self.rightNow += amount
        if self._unsorted:
            self._sort()
        while self.calls and self.calls[0].getTime() <= self.rightNow:
            call = self.calls.pop(0)
            del self._places[0]
            call.called = 1
            call.func(*call.args, **call.kw)
            if self._unsorted:
                self._sort()


def simulated_host(index: int) -> str:
    """Node ``index``'s address: 10.0.0.1 for node 0, counting up through 10.0.1.0."""
    number = index + 1
    return f"10.{number // 65536 % 256}.{number // 256 % 256}.{number % 256}"


class SimulatedCluster:
    """``size`` DHT routers on one memory network and one ``task.Clock``, all joining
    through node 0, each started ``stagger`` seconds after the one before.

    The clock jumps from one scheduled call to the next, so a simulated hour costs
    only the events in it. Node ids, transaction ids, refresh targets and packet
    loss all come from ``seed``: runs are repeatable.
    """

    ROUTER_PORT = 5001

    def __init__(
        self,
        size: int,
        loss: float = 0.0,
        seed: int = 1,
        secret: bytes | None = None,
        stagger: float = 0.0,
        latency: float = 0.001,
        record_ttl: float | None = None,
        republish_interval: float | None = None,
    ) -> None:
        """``record_ttl`` and ``republish_interval`` (the nodes' defaults when None) may be
        scaled down together, so that a republish and an expiry fit in a few simulated
        minutes rather than twenty, each minute of which costs every node a bootstrap."""
        self.clock = SimulationClock()
        self._protocol_options: dict[str, Any] = {}
        if record_ttl is not None:
            self._protocol_options["record_ttl"] = record_ttl
        self._router_options: dict[str, float] = {}
        if republish_interval is not None:
            self._router_options["republish_interval"] = republish_interval
        self.network = MemoryUDPNetwork(self.clock, latency=latency, loss=loss, seed=seed)
        self._ids = random.Random(seed)
        self._seeds = FixedBootstrapper([(simulated_host(0), self.ROUTER_PORT)])
        self._secret = secret
        self.routers: list[KademliaRouter] = []
        for _ in range(size):
            self.add_node()
            self.run(stagger)
        self.run(30)

    def add_node(self) -> KademliaRouter:
        index = len(self.routers)
        node_id = self._ids.randbytes(32)
        protocol = KademliaProtocol(
            self.clock,
            node_id,
            5000 + index % 3,
            secret=self._secret,
            randbytes=random.Random(self._ids.getrandbits(64)).randbytes,
            **self._protocol_options,
        )
        self.network.attach(protocol, simulated_host(index), self.ROUTER_PORT)
        router = KademliaRouter(
            self.clock, protocol, self._seeds, self.ROUTER_PORT, **self._router_options
        )
        self.routers.append(router)
        router.startService()
        return router

    def address(self, index: int) -> tuple[str, int]:
        """Where node ``index``'s registry is, as a lookup reports it."""
        return (simulated_host(index), 5000 + index % 3)

    def vanish(self, index: int) -> None:
        """Node ``index`` goes without a word, as a crashed machine does."""
        self.network.vanish(simulated_host(index), self.ROUTER_PORT)
        # Its timers stop too; what it still sends, such as withdrawals, reaches nobody.
        self.routers[index].stopService()

    def _next_event(self, end: float) -> bool:
        calls = self.clock.calls
        if not calls or calls[0].getTime() > end:
            return False
        self.clock.advance(max(0.0, calls[0].getTime() - self.clock.seconds()))
        return True

    def run(self, seconds: float) -> None:
        end = self.clock.seconds() + seconds
        while self._next_event(end):
            pass
        self.clock.advance(max(0.0, end - self.clock.seconds()))

    def wait(self, d: Deferred[Any], limit: float = 60.0) -> Any:
        """Run the clock until ``d`` fires; its result, or the Failure it failed with."""
        results: list[Any] = []
        d.addBoth(results.append)
        end = self.clock.seconds() + limit
        while not results and self._next_event(end):
            pass
        if not results:
            raise AssertionError(f"did not finish in {limit} simulated seconds")
        return results[0]

    def providers(self, router: KademliaRouter, key: str, count: int = 5) -> list[tuple[str, int]]:
        """Every provider one lookup yields, in the order found."""
        return self.lookups([(router, key)], count)[0]

    def lookups(
        self, asks: Sequence[tuple[KademliaRouter, str]], count: int = 5
    ) -> list[list[tuple[str, int]]]:
        """Run all the ``(router, key)`` lookups at once, as a node pulling many layers
        does; each one's providers, in the order of ``asks``. At once, the simulated
        time they take is that of the slowest, not the sum."""
        done: Deferred[list[list[tuple[str, int]]]] = gatherResults(
            [Deferred.fromCoroutine(_drain(router.lookup(key, count))) for router, key in asks]
        )
        result = self.wait(done)
        if isinstance(result, Failure):
            result.raiseException()
        return list(result)


async def _drain(lookup: ILookup) -> list[tuple[str, int]]:
    found = []
    while (provider := await lookup.next_provider()) is not None:
        found.append(provider)
    return found
