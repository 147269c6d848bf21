"""In-memory implementations of the seams, for tests and for running the registry alone."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IUDPTransport
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from spegel_tx.content import Descriptor, Image, ImageEvent, ImageEventKind
from spegel_tx.errors import NotFound
from spegel_tx.interfaces import IBlob, IContentStore
from spegel_tx.oci.manifest import children, detect_media_type

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
    destination has vanished.
    """

    def __init__(
        self, clock: Any, latency: float = 0.001, loss: float = 0.0, seed: int = 0
    ) -> None:
        self.clock = clock
        self.latency = latency
        self.loss = loss
        self._random = random.Random(seed)
        self._endpoints: dict[tuple[str, int], DatagramProtocol] = {}
        self.sent = 0

    def attach(self, protocol: DatagramProtocol, host: str, port: int) -> None:
        self._endpoints[(host, port)] = protocol
        protocol.makeConnection(_MemoryUDPTransport(self, host, port))

    def vanish(self, host: str, port: int) -> None:
        """The node goes without a word: nothing it sent or will be sent arrives."""
        self._endpoints.pop((host, port), None)

    def send(self, source: tuple[str, int], data: bytes, destination: tuple[str, int]) -> None:
        self.sent += 1
        if source not in self._endpoints:
            return
        if self.loss and self._random.random() < self.loss:
            return
        self.clock.callLater(self.latency, self._deliver, source, data, destination)

    def _deliver(self, source: tuple[str, int], data: bytes, destination: tuple[str, int]) -> None:
        protocol = self._endpoints.get(destination)
        if protocol is not None:
            protocol.datagramReceived(data, source)


@implementer(IUDPTransport)
class _MemoryUDPTransport:
    def __init__(self, network: MemoryUDPNetwork, host: str, port: int) -> None:
        self._network = network
        self._address = (host, port)

    def write(self, packet: bytes, addr: tuple[str, int] | None = None) -> None:
        if addr is None:
            raise ValueError("an unconnected UDP transport needs an address")
        self._network.send(self._address, packet, addr)

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", *self._address)

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
