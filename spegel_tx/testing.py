"""In-memory implementations of the seams, for tests and for running the registry alone."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred, fail, succeed
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
