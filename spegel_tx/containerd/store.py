"""``IContentStore`` over a node's containerd: gRPC for metadata, the content directory for bytes.

Every gRPC call blocks, so all of them run on a dedicated thread pool and come
back as Deferreds. Blob bytes are read straight from containerd's content
directory when this process can see it, so the registry can ``sendfile`` them;
when it cannot (another mount namespace, no permission) they are streamed over
gRPC instead. containerd going away never stops the service: ``ready()`` turns
False and a probe retries with backoff until containerd answers again.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from spegel_tx.containerd.client import CHECK_CONTAINERD, ContainerdClient, Stream
from spegel_tx.containerd.contentwatch import ContentWatcher
from spegel_tx.containerd.events import EventWatcher, RunInThread, start_thread
from spegel_tx.containerd.ingests import Ingest, blob_files, open_data, scan_ingests
from spegel_tx.content import Descriptor, Image, ImageEvent
from spegel_tx.errors import InvalidDigest, NotFound, SpegelError, Unavailable
from spegel_tx.interfaces import IBlob, IContentStore, IDownloads
from spegel_tx.oci.digest import parse_digest
from spegel_tx.oci.manifest import (
    MANIFEST_MEDIA_TYPES,
    MAX_MANIFEST_SIZE,
    children,
    detect_media_type,
)

log = Logger()

T = TypeVar("T")

OCTET_STREAM = "application/octet-stream"
CONTENT_PLUGIN_FILTER = "type==io.containerd.content.v1,id==content"
# The most a FileBlob reads at once; bigger transfers use fileno() and sendfile.
MAX_READ = 1024 * 1024
FOLLOW_INTERVAL = 0.02
"""Seconds between looks at a download's ``data`` that has no new bytes yet. containerd
writes about 1 MiB at a time, so this adds at most 20 ms to each megabyte."""
SNIFF_SIZE = 64


def may_be_json(head: bytes) -> bool:
    """False when the first bytes of some content show it is no JSON object."""
    start = head.lstrip()
    return not start or start.startswith(b"{")


class MediaTypeCache:
    """A bounded LRU of digest to media type; content is immutable, so entries never go stale."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str) -> str | None:
        media_type = self._entries.get(digest)
        if media_type is not None:
            self._entries.move_to_end(digest)
        return media_type

    def put(self, digest: str, media_type: str) -> None:
        self._entries[digest] = media_type
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


@implementer(IBlob)
class FileBlob:
    """Content read from containerd's content directory through one open descriptor.

    Reads are ``pread`` on the reactor thread: the registry asks for at most a
    chunk at a time, and big transfers go through ``fileno`` and sendfile.
    """

    def __init__(self, fd: int, size: int) -> None:
        self._fd: int | None = fd
        self.size = size

    def fileno(self) -> int | None:
        return self._fd

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if self._fd is None:
            return fail(ValueError("read from a closed blob"))
        if offset >= self.size or length <= 0:
            return succeed(b"")
        try:
            return succeed(os.pread(self._fd, min(length, self.size - offset, MAX_READ), offset))
        except OSError:
            return fail()

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class IngestEnded(SpegelError):
    """A download being followed stopped before its end: stalled, or cancelled."""


class GrowingBlob(FileBlob):
    """A blob containerd is still writing (see ``ingests.py``): reads wait for its bytes,
    and fail with IngestEnded once ``data`` has not grown for ``stall_timeout`` or was
    removed unfinished. ``fileno`` is None: sendfile would stop at the bytes written."""

    def __init__(self, clock: Any, fd: int, size: int, stall_timeout: float) -> None:
        super().__init__(fd, size)
        self._clock = clock
        self._stall_timeout = stall_timeout
        self._seen = -1
        self._grew_at = clock.seconds()
        self._waiting: Deferred[bytes] | None = None
        self._timer: IDelayedCall | None = None

    def fileno(self) -> int | None:
        return None

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if self._fd is None:
            return fail(ValueError("read from a closed blob"))
        if offset >= self.size or length <= 0:
            return succeed(b"")
        waiting = self._waiting = Deferred(lambda _: self._stop_waiting())
        self._look(offset, length)
        return waiting

    def _look(self, offset: int, length: int) -> None:
        """Fire the waiting read with the bytes at ``offset`` if written yet, or with
        IngestEnded; otherwise look again in FOLLOW_INTERVAL."""
        self._timer = None
        waiting = self._waiting
        if waiting is None or self._fd is None:
            return
        try:
            stat = os.fstat(self._fd)
            now = self._clock.seconds()
            if stat.st_size > self._seen:
                self._seen, self._grew_at = stat.st_size, now
            if offset < stat.st_size:
                data = os.pread(self._fd, min(length, stat.st_size - offset, MAX_READ), offset)
            elif stat.st_nlink == 0:
                raise IngestEnded(
                    f"the download was cancelled at {stat.st_size} of {self.size} bytes"
                )
            elif now - self._grew_at >= self._stall_timeout:
                raise IngestEnded(
                    f"the download stalled at {stat.st_size} of {self.size} bytes "
                    f"(no growth for {self._stall_timeout:g} s)"
                )
            else:
                self._timer = self._clock.callLater(FOLLOW_INTERVAL, self._look, offset, length)
                return
        except (OSError, IngestEnded) as e:
            self._waiting = None
            waiting.errback(e)
            return
        self._waiting = None
        waiting.callback(data)

    def _stop_waiting(self) -> None:
        self._waiting = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def close(self) -> None:
        self._stop_waiting()
        super().close()


@implementer(IBlob)
class StreamBlob:
    """Content streamed over containerd's Read call, for when its files are out of reach.

    One Read stream serves sequential reads, a chunk per pull, with the
    surplus of a chunk kept for the next read; a read elsewhere opens a new
    stream at that offset. Reads are serialised, as a stream has one position.
    """

    def __init__(
        self,
        call: Callable[..., Deferred[Any]],
        client: ContainerdClient,
        digest: str,
        size: int,
    ) -> None:
        self._call = call
        self._client = client
        self._digest = digest
        self.size = size
        self._lock = DeferredLock()
        self._stream: Stream[bytes] | None = None
        self._buffer = b""
        self._buffer_offset = 0
        self._closed = False

    def fileno(self) -> int | None:
        return None

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if self._closed:
            return fail(ValueError("read from a closed blob"))
        if offset >= self.size or length <= 0:
            return succeed(b"")
        return self._lock.run(self._read, offset, length)

    def _read(self, offset: int, length: int) -> Deferred[bytes]:
        if self._closed:
            return fail(ValueError("read from a closed blob"))
        end = self._buffer_offset + len(self._buffer)
        if self._buffer_offset <= offset < end:
            return succeed(self._take(offset, length))
        stream = self._stream if offset == end else None
        if stream is None and self._stream is not None:
            self._stream.cancel()
            self._stream = None
        d = self._call(self._pull, stream, offset)
        d.addCallback(self._pulled, offset, length)
        return d

    def _pull(self, stream: Stream[bytes] | None, offset: int) -> tuple[Stream[bytes], bytes]:
        """In the pool: the next non-empty chunk, opening a stream at ``offset`` if need be."""
        if stream is None:
            stream = self._client.read_content(self._digest, offset)
        for chunk in stream:
            if chunk:
                return stream, chunk
        return stream, b""

    def _pulled(self, result: tuple[Stream[bytes], bytes], offset: int, length: int) -> bytes:
        stream, chunk = result
        if self._closed:
            stream.cancel()
            raise ValueError("blob closed during a read")
        if not chunk:
            stream.cancel()
            raise Unavailable(f"containerd ended {self._digest} at {offset} of {self.size} bytes")
        self._stream = stream
        self._buffer = chunk
        self._buffer_offset = offset
        return self._take(offset, length)

    def _take(self, offset: int, length: int) -> bytes:
        start = offset - self._buffer_offset
        data = self._buffer[start : start + length]
        self._buffer = self._buffer[start + len(data) :]
        self._buffer_offset = offset + len(data)
        return data

    def close(self) -> None:
        self._closed = True
        self._buffer = b""
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None


@implementer(IContentStore, IDownloads)
class ContainerdStore(Service):
    """The images and content of one containerd namespace.

    ``content_path`` is containerd's content directory (the one holding
    ``blobs/``); empty means ask containerd, which works when this process
    shares its mount namespace. ``client``, ``threadpool`` and
    ``run_in_thread`` replace the real ones in tests.
    """

    def __init__(
        self,
        reactor: Any,
        address: str,
        namespace: str,
        content_path: str = "",
        max_threads: int = 8,
        *,
        min_retry_delay: float = 0.5,
        max_retry_delay: float = 30.0,
        media_type_cache_size: int = 4096,
        stall_timeout: float = 3.0,
        client: ContainerdClient | None = None,
        threadpool: ThreadPool | None = None,
        run_in_thread: RunInThread = start_thread,
    ) -> None:
        self._reactor = reactor
        self.address = address
        self.namespace = namespace
        self.content_path = content_path
        self._max_threads = max_threads
        self._min_retry_delay = min_retry_delay
        self._max_retry_delay = max_retry_delay
        self._retry_delay = min_retry_delay
        self._media_types = MediaTypeCache(media_type_cache_size)
        self.stall_timeout = stall_timeout
        """A download that has not grown for this long is no longer followed or offered."""
        self._download_listeners: list[Callable[[], None]] = []
        self._content_watcher: ContentWatcher | None = None
        self._given_client = client
        self._given_threadpool = threadpool
        self._run_in_thread = run_in_thread
        self._client: ContainerdClient | None = None
        self._pool: ThreadPool | None = None
        self._watcher: EventWatcher | None = None
        self._handlers: list[Callable[[ImageEvent], None]] = []
        self._ready = False
        self._down_logged = False
        self._probing = False
        self._probe_call: IDelayedCall | None = None

    # Service

    def startService(self) -> None:
        Service.startService(self)
        # Created here, not in __init__: a gRPC channel must not cross twistd's fork.
        self._client = self._given_client or ContainerdClient(self.address, self.namespace)
        self._pool = self._given_threadpool or ThreadPool(
            minthreads=0, maxthreads=self._max_threads, name="spegel-containerd"
        )
        self._pool.start()
        self._watcher = EventWatcher(
            self._reactor,
            self._client,
            self.namespace,
            self._dispatch,
            self._check_containerd,
            self._min_retry_delay,
            self._max_retry_delay,
            self._run_in_thread,
        )
        self._watcher.start()
        self._retry_delay = self._min_retry_delay
        self._probe()

    def stopService(self) -> None:
        Service.stopService(self)
        self._ready = False
        if self._probe_call is not None and self._probe_call.active():
            self._probe_call.cancel()
        self._probe_call = None
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._content_watcher is not None:
            self._content_watcher.stop()
            self._content_watcher = None
        if self._client is not None:
            # Cancels calls still in flight, so the pool's threads can finish.
            self._client.close()
            self._client = None
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    @property
    def subscriptions(self) -> int:
        """How many event streams were opened since the service started."""
        return self._watcher.subscriptions if self._watcher is not None else 0

    # Readiness

    def ready(self) -> bool:
        return self._ready

    def _probe(self) -> None:
        """Ask containerd its version; keep asking, with backoff, until it answers."""
        self._probe_call = None
        if not self.running or self._probing:
            return
        self._probing = True
        d = self._in_pool(self._probe_blocking)
        d.addCallbacks(self._answered, self._not_answering)

    def _probe_blocking(self) -> str:
        client = self._require_client()
        version = client.version().version
        if not self.content_path:
            for plugin in client.plugins([CONTENT_PLUGIN_FILTER]):
                if plugin.exports.get("root"):
                    self.content_path = plugin.exports["root"]
        return version

    def _answered(self, version: str) -> None:
        self._probing = False
        self._retry_delay = self._min_retry_delay
        if not self.running or self._ready:
            return
        self._ready = True
        self._down_logged = False
        self._watch_content()
        log.info(
            "containerd {version} answering at {address} (namespace {namespace}, content {path})",
            version=version,
            address=self.address,
            namespace=self.namespace,
            path=self.content_path or "over gRPC only",
        )

    def _not_answering(self, failure: Failure) -> None:
        self._probing = False
        self._ready = False
        if not self.running:
            return
        delay = self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, self._max_retry_delay)
        # Once per outage: the retries that follow are debug, the recovery is info.
        level = LogLevel.debug if self._down_logged else LogLevel.warn
        self._down_logged = True
        log.emit(
            level,
            "containerd not reachable at {address} ({error}); retrying (backoff up to "
            "{max_delay}s), and saying so once it answers. " + CHECK_CONTAINERD,
            address=self.address,
            error=failure.getErrorMessage(),
            delay=delay,
            max_delay=self._max_retry_delay,
        )
        self._probe_call = self._reactor.callLater(delay, self._probe)

    def _check_containerd(self) -> None:
        """Probe now (the event stream broke): ``ready()`` follows a containerd restart."""
        if self._ready and self._probe_call is None:
            self._probe()

    def _lost(self, failure: Failure) -> Failure:
        """Errback of every call: an unreachable containerd makes us unready and probing."""
        if failure.check(Unavailable) and self._ready and self.running:
            self._ready = False
            self._down_logged = True
            log.warn(
                "containerd at {address} stopped answering ({error}); probing again, and "
                "saying so once it answers. " + CHECK_CONTAINERD,
                address=self.address,
                error=failure.getErrorMessage(),
            )
            if self._probe_call is None:
                self._retry_delay = self._min_retry_delay
                self._probe()
        return failure

    # Running blocking work

    def _require_client(self) -> ContainerdClient:
        client = self._client
        if client is None:
            raise Unavailable("the containerd store is not running")
        return client

    def _in_pool(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        if self._pool is None:
            return fail(Unavailable("the containerd store is not running"))
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def _call(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return self._in_pool(f, *args).addErrback(self._lost)

    def _blob_path(self, digest: str) -> str | None:
        if not self.content_path:
            return None
        algorithm, _, encoded = digest.partition(":")
        return os.path.join(self.content_path, "blobs", algorithm, encoded)

    def _read_document(self, digest: str) -> bytes | None:
        """In the pool: the whole content if it may be JSON, else None after its first bytes.

        Comes from disk if we can, else over gRPC; either way a layer is not
        read past its first chunk just to learn it is no manifest.
        """
        path = self._blob_path(digest)
        if path is not None:
            try:
                with open(path, "rb") as f:
                    head = f.read(SNIFF_SIZE)
                    return head + f.read() if may_be_json(head) else None
            except OSError:
                pass
        stream = self._require_client().read_content(digest)
        parts: list[bytes] = []
        try:
            for chunk in stream:
                if not parts and not may_be_json(chunk):
                    return None
                parts.append(chunk)
        finally:
            stream.cancel()
        return b"".join(parts)

    # IContentStore

    def images(self) -> Deferred[list[Image]]:
        return self._call(self._images_blocking)

    def _images_blocking(self) -> list[Image]:
        return [
            Image(image.name, image.target.digest, image.target.media_type)
            for image in self._require_client().list_images()
        ]

    def resolve(self, name: str) -> Deferred[str]:
        return self._call(self._resolve_blocking, name)

    def _resolve_blocking(self, name: str) -> str:
        return self._require_client().get_image(name).target.digest

    def descriptor(self, digest: str) -> Deferred[Descriptor]:
        try:
            parse_digest(digest)
        except InvalidDigest:
            return fail()
        cached = self._media_types.get(digest)
        d = self._call(self._descriptor_blocking, digest, cached)
        return d.addCallback(self._remember_media_type)

    def _descriptor_blocking(self, digest: str, media_type: str | None) -> Descriptor:
        size = self._require_client().content_info(digest).size
        if media_type is None:
            if size <= MAX_MANIFEST_SIZE:
                data = self._read_document(digest)
                detected = detect_media_type(data) if data is not None else None
                media_type = detected or OCTET_STREAM
            else:
                media_type = OCTET_STREAM
        return Descriptor(digest, media_type, size)

    def _remember_media_type(self, descriptor: Descriptor) -> Descriptor:
        self._media_types.put(descriptor.digest, descriptor.media_type)
        return descriptor

    def open(self, digest: str) -> Deferred[IBlob]:
        try:
            parse_digest(digest)
        except InvalidDigest:
            return fail()
        return self._call(self._open_blocking, digest).addCallback(self._opened, digest)

    def _open_blocking(self, digest: str) -> tuple[int, int | None]:
        """In the pool: ``(size, fd)``, fd None when the file cannot be opened here."""
        size = self._require_client().content_info(digest).size
        path = self._blob_path(digest)
        if path is None:
            return size, None
        try:
            return size, os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            log.debug("Reading {digest} over gRPC: {error}", digest=digest, error=e)
            return size, None

    def _opened(self, result: tuple[int, int | None], digest: str) -> IBlob:
        size, fd = result
        if fd is not None:
            return FileBlob(fd, size)
        return StreamBlob(self._call, self._require_client(), digest, size)

    def digests(self, image: Image) -> Deferred[list[str]]:
        return self._call(self._digests_blocking, image)

    def _digests_blocking(self, image: Image) -> list[str]:
        """Walk index, manifests, configs and layers; keep what the namespace holds."""
        sizes = {info.digest: info.size for info in self._require_client().list_content()}
        found: list[str] = []
        seen: set[str] = set()
        pending = [(image.digest, image.media_type)]
        while pending:
            digest, media_type = pending.pop(0)
            if digest in seen:
                continue
            seen.add(digest)
            if digest not in sizes:
                continue
            found.append(digest)
            maybe_manifest = media_type in MANIFEST_MEDIA_TYPES or not media_type
            if maybe_manifest and sizes[digest] <= MAX_MANIFEST_SIZE:
                try:
                    data = self._read_document(digest)
                except NotFound:
                    continue  # deleted since we listed it
                if data is not None:
                    pending.extend((child.digest, child.media_type) for child in children(data))
        return found

    # IDownloads

    def downloads(self) -> Deferred[dict[str, Ingest]]:
        if not self.content_path:
            return succeed({})
        return self._in_pool(scan_ingests, self.content_path, self.namespace)

    def blob_files(self) -> Deferred[set[str]]:
        if not self.content_path:
            return succeed(set())
        return self._in_pool(blob_files, self.content_path)

    def committed(self, digests: Iterable[str]) -> Deferred[set[str]]:
        return self._call(self._committed_blocking, list(digests))

    def _committed_blocking(self, digests: list[str]) -> set[str]:
        """Asked of containerd, not of the directory: blobs are shared by namespaces."""
        client = self._require_client()
        held = set()
        for digest in digests:
            try:
                client.content_info(digest)
            except NotFound:
                continue
            held.add(digest)
        return held

    def open_download(self, digest: str) -> Deferred[IBlob]:
        if not self.content_path:
            return fail(NotFound(f"{digest} is not being downloaded here"))
        return self._in_pool(self._open_download_blocking, digest).addCallback(self._followed)

    def _open_download_blocking(self, digest: str) -> tuple[int, int]:
        ingest = scan_ingests(self.content_path, self.namespace).get(digest)
        if ingest is None or not ingest.live(time.time(), self.stall_timeout):
            raise NotFound(f"{digest} is not being downloaded here")
        try:
            return open_data(ingest), ingest.total
        except OSError as e:
            raise NotFound(f"{digest} stopped being downloaded here: {e}") from e

    def _followed(self, opened: tuple[int, int]) -> IBlob:
        fd, total = opened
        return GrowingBlob(self._reactor, fd, total, self.stall_timeout)

    def watch_downloads(self, changed: Callable[[], None]) -> None:
        self._download_listeners.append(changed)
        self._watch_content()

    @property
    def watching(self) -> bool:
        return self._content_watcher is not None

    def _watch_content(self) -> None:
        """Start inotify once containerd answers and its content directory is known."""
        if self._content_watcher is not None or not self._download_listeners:
            return
        if not self.content_path or not self.running or not self._ready:
            return
        watcher = ContentWatcher(self._reactor, self.content_path, self._downloads_changed)
        if watcher.start():
            self._content_watcher = watcher

    def _downloads_changed(self) -> None:
        for listener in list(self._download_listeners):
            listener()

    def subscribe(self, handler: Callable[[ImageEvent], None]) -> Callable[[], None]:
        self._handlers.append(handler)

        def unsubscribe() -> None:
            if handler in self._handlers:
                self._handlers.remove(handler)

        return unsubscribe

    def _dispatch(self, event: ImageEvent) -> None:
        for handler in list(self._handlers):
            try:
                handler(event)
            except Exception:
                log.failure(
                    "Image event handler {handler} failed on {event}", handler=handler, event=event
                )
