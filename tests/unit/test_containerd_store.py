"""ContainerdStore without containerd: a fake client, a threadless pool and a task.Clock."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from spegel_tx.containerd.api import (
    content_pb2,
    image_events_pb2,
    images_pb2,
    introspection_pb2,
    version_pb2,
)
from spegel_tx.containerd.client import decode_envelope
from spegel_tx.containerd.events import event_filters, to_image_event
from spegel_tx.containerd.store import (
    MAX_READ,
    ContainerdStore,
    FileBlob,
    MediaTypeCache,
    StreamBlob,
)
from spegel_tx.content import Image, ImageEvent, ImageEventKind
from spegel_tx.errors import InvalidDigest, NotFound, Unavailable
from spegel_tx.interfaces import IBlob, IContentStore, IDownloads
from spegel_tx.oci.manifest import OCI_INDEX, OCI_MANIFEST


class FakeReactor(Clock):
    """A clock whose threads are the caller: callFromThread runs at once."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class InlinePool:
    """A ThreadPool that runs each job in the calling thread."""

    def __init__(self) -> None:
        self.started = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *args: Any
    ) -> None:
        try:
            result = f(*args)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class FakeStream:
    """A ``client.Stream`` over a list, ending with ``error`` if given."""

    def __init__(self, items: Iterable[Any], error: Exception | None = None) -> None:
        self._items = iter(items)
        self._error = error
        self.cancelled = False

    def __iter__(self) -> FakeStream:
        return self

    def __next__(self) -> Any:
        if self.cancelled:
            raise StopIteration
        try:
            return next(self._items)
        except StopIteration:
            if self._error is not None:
                raise self._error from None
            raise

    def cancel(self) -> None:
        self.cancelled = True


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeClient:
    """containerd's read API over dictionaries; ``down`` makes every call Unavailable."""

    def __init__(self, chunk: int = 7) -> None:
        self.blobs: dict[str, bytes] = {}
        self.images: dict[str, images_pb2.Image] = {}
        self.down = False
        self.chunk = chunk
        self.calls: list[str] = []
        self.reads: list[tuple[str, int]] = []
        self.chunks_sent = 0
        self.subscriptions: list[FakeStream] = []
        self.streams: list[FakeStream] = []
        self.next_events: list[list[Any]] = []
        self.content_root = ""
        self.closed = False

    def add(self, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[digest] = data
        return digest

    def tag(self, name: str, digest: str, media_type: str) -> None:
        target = {"digest": digest, "media_type": media_type, "size": len(self.blobs[digest])}
        self.images[name] = images_pb2.Image(name=name, target=target)

    def _check(self, call: str) -> None:
        self.calls.append(call)
        if self.down:
            raise Unavailable("containerd: connection refused")

    def close(self) -> None:
        self.closed = True

    def version(self) -> version_pb2.VersionResponse:
        self._check("version")
        return version_pb2.VersionResponse(version="1.6.20", revision="fake")

    def plugins(self, filters: Iterable[str] = ()) -> list[introspection_pb2.Plugin]:
        self._check("plugins")
        exports = {"root": self.content_root} if self.content_root else {}
        return [
            introspection_pb2.Plugin(type="io.containerd.content.v1", id="content", exports=exports)
        ]

    def get_image(self, name: str) -> images_pb2.Image:
        self._check("get_image")
        if name not in self.images:
            raise NotFound(name)
        return self.images[name]

    def list_images(self) -> list[images_pb2.Image]:
        self._check("list_images")
        return list(self.images.values())

    def content_info(self, digest: str) -> content_pb2.Info:
        self._check("content_info")
        if digest not in self.blobs:
            raise NotFound(digest)
        return content_pb2.Info(digest=digest, size=len(self.blobs[digest]))

    def list_content(self) -> list[content_pb2.Info]:
        self._check("list_content")
        return [content_pb2.Info(digest=d, size=len(b)) for d, b in self.blobs.items()]

    def read_content(self, digest: str, offset: int = 0, size: int = 0) -> FakeStream:
        self._check("read_content")
        self.reads.append((digest, offset))
        if digest not in self.blobs:
            stream = FakeStream([], NotFound(digest))
        else:
            stream = FakeStream(self._chunks(self.blobs[digest][offset:]))
        self.streams.append(stream)
        return stream

    def _chunks(self, data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), self.chunk):
            self.chunks_sent += 1
            yield data[i : i + self.chunk]

    def subscribe(self, filters: Iterable[str] = ()) -> FakeStream:
        self._check("subscribe")
        events = self.next_events.pop(0) if self.next_events else []
        stream = FakeStream(events, Unavailable("stream broke"))
        self.subscriptions.append(stream)
        return stream


def run_inline(target: Callable[[], None]) -> None:
    target()


def make_store(client: FakeClient, content_path: str = "", **kwargs: Any) -> ContainerdStore:
    kwargs.setdefault("run_in_thread", run_inline)
    return ContainerdStore(
        FakeReactor(),
        "/run/fake.sock",
        "k8s.io",
        content_path,
        client=client,  # type: ignore[arg-type]
        threadpool=InlinePool(),  # type: ignore[arg-type]
        **kwargs,
    )


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def demo(client: FakeClient) -> dict[str, Any]:
    """An index, a manifest, a config and two layers; the second layer is absent."""
    layer = client.add(b"layer bytes " * 10)
    absent = sha256(b"never pulled")
    config = client.add(b'{"architecture": "amd64", "os": "linux"}')
    manifest_data = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config,
                "size": 1,
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 1},
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": absent,
                    "size": 1,
                },
            ],
        }
    ).encode()
    manifest = client.add(manifest_data)
    index = client.add(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [{"mediaType": OCI_MANIFEST, "digest": manifest, "size": 1}],
            }
        ).encode()
    )
    client.tag("docker.io/library/demo:v1", index, OCI_INDEX)
    return {"index": index, "manifest": manifest, "config": config, "layer": layer}


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


@pytest.fixture
def store(client: FakeClient):
    store = make_store(client)
    store.startService()
    yield store
    store.stopService()


def test_provides_the_interfaces(store: ContainerdStore) -> None:
    assert verifyObject(IContentStore, store)
    assert verifyObject(IDownloads, store)
    assert verifyObject(IService, store)


def test_ready_once_containerd_answers(store: ContainerdStore, client: FakeClient) -> None:
    assert store.ready()
    assert client.calls[:2] == ["subscribe", "version"]


def test_asks_containerd_for_the_content_path(client: FakeClient) -> None:
    client.content_root = "/var/lib/containerd/io.containerd.content.v1.content"
    store = make_store(client)
    store.startService()
    assert store.content_path == client.content_root
    store.stopService()
    given = make_store(client, "/elsewhere")
    given.startService()
    assert given.content_path == "/elsewhere"
    given.stopService()


def test_retries_with_capped_backoff_while_containerd_is_down(client: FakeClient) -> None:
    client.down = True
    store = make_store(client, max_retry_delay=4.0)
    reactor = store._reactor
    with capturedLogs() as events:
        store.startService()
        delays = []
        for _ in range(5):
            assert not store.ready()
            [call] = [c for c in reactor.getDelayedCalls() if c.func == store._probe]
            delays.append(call.getTime() - reactor.seconds())
            reactor.advance(delays[-1])
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0]
    tries = [e for e in events if "not reachable" in e.get("log_format", "")]
    assert len(tries) == 6, "the first try and five retries"
    assert [e["log_level"] for e in tries] == [LogLevel.warn] + [LogLevel.debug] * 5, (
        "one warning per outage"
    )
    assert tries[0]["address"] == "/run/fake.sock"
    assert tries[0]["delay"] == 0.5
    assert formatEvent(tries[0]).endswith("Check containerd-sock, or run `spegel-tx doctor`.")
    client.down = False
    with capturedLogs() as events:
        reactor.advance(4.0)
    assert store.ready()
    said = [formatEvent(e).split(" at ")[0] for e in events if e["log_level"] != LogLevel.debug]
    assert said == ["containerd 1.6.20 answering"]
    client.down = True
    with capturedLogs() as events:
        store.images().addErrback(lambda _: None)
        reactor.advance(0.5)
    said = [formatEvent(e).split(" (")[0] for e in events if e["log_level"] != LogLevel.debug]
    assert said == ["containerd at /run/fake.sock stopped answering"], "a new outage, once"
    store.stopService()
    assert reactor.getDelayedCalls() == []


def test_unready_when_a_call_finds_containerd_gone(
    store: ContainerdStore, client: FakeClient
) -> None:
    demo(client)
    client.down = True
    with pytest.raises(Unavailable):
        result_of(store.images())
    assert not store.ready()
    client.down = False
    store._reactor.advance(0.5)
    assert store.ready()
    assert result_of(store.resolve("docker.io/library/demo:v1"))


def test_unready_when_the_event_stream_breaks_and_containerd_is_gone(client: FakeClient) -> None:
    readers: list[Callable[[], None]] = []
    store = make_store(client, run_in_thread=readers.append)
    store.startService()
    assert store.ready()
    client.down = True
    readers.pop()()  # the stream reader runs, and the stream breaks
    assert not store.ready()
    client.down = False
    store._reactor.advance(0.5)
    assert store.ready()
    store.stopService()


def test_calls_fail_unavailable_when_stopped(client: FakeClient) -> None:
    store = make_store(client)
    with pytest.raises(Unavailable):
        result_of(store.images())


def test_images_and_resolve(store: ContainerdStore, client: FakeClient) -> None:
    digests = demo(client)
    assert result_of(store.images()) == [
        Image("docker.io/library/demo:v1", digests["index"], OCI_INDEX)
    ]
    assert result_of(store.resolve("docker.io/library/demo:v1")) == digests["index"]
    with pytest.raises(NotFound):
        result_of(store.resolve("docker.io/library/absent:v1"))


def test_descriptor_tells_manifests_and_caches(store: ContainerdStore, client: FakeClient) -> None:
    digests = demo(client)
    assert result_of(store.descriptor(digests["index"])).media_type == OCI_INDEX
    assert result_of(store.descriptor(digests["manifest"])).media_type == OCI_MANIFEST
    config = result_of(store.descriptor(digests["config"]))
    assert config.media_type == "application/octet-stream"
    assert config.size == len(client.blobs[digests["config"]])
    reads = len(client.reads)
    again = result_of(store.descriptor(digests["manifest"]))
    assert again.media_type == OCI_MANIFEST
    assert len(client.reads) == reads, "a cached media type is not read again"
    with pytest.raises(NotFound):
        result_of(store.descriptor(sha256(b"absent")))
    with pytest.raises(InvalidDigest):
        result_of(store.descriptor("sha256:../../etc/passwd"))


def test_large_content_is_not_read_for_its_media_type(
    store: ContainerdStore, client: FakeClient
) -> None:
    big = client.add(b"{" + b" " * (4 * 1024 * 1024))
    assert result_of(store.descriptor(big)).media_type == "application/octet-stream"
    assert client.reads == []


def test_a_layer_is_not_read_past_its_first_chunk(
    store: ContainerdStore, client: FakeClient
) -> None:
    layer = client.add(b"\x1f\x8b" + b"x" * 100)
    document = client.add(b'  {"schemaVersion": 2, "mediaType": "%s"}' % OCI_INDEX.encode())
    assert result_of(store.descriptor(layer)).media_type == "application/octet-stream"
    assert client.chunks_sent == 1
    assert result_of(store.descriptor(document)).media_type == OCI_INDEX


def test_media_type_cache_evicts_least_recently_used() -> None:
    cache = MediaTypeCache(max_entries=2)
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"
    cache.put("c", "C")
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == ("A", None, "C")
    assert len(cache) == 2


def test_digests_walk_the_image_and_keep_what_is_present(
    store: ContainerdStore, client: FakeClient
) -> None:
    digests = demo(client)
    [image] = result_of(store.images())
    found = result_of(store.digests(image))
    assert found == [digests[k] for k in ("index", "manifest", "config", "layer")]
    assert client.calls.count("list_content") == 1


def write_blob(root: Any, digest: str, data: bytes) -> None:
    algorithm, encoded = digest.split(":")
    path = root / "blobs" / algorithm
    path.mkdir(parents=True, exist_ok=True)
    (path / encoded).write_bytes(data)


def test_open_reads_from_disk_with_a_file_descriptor(client: FakeClient, tmp_path: Any) -> None:
    digests = demo(client)
    data = client.blobs[digests["layer"]]
    write_blob(tmp_path, digests["layer"], data)
    store = make_store(client, str(tmp_path))
    store.startService()
    blob = result_of(store.open(digests["layer"]))
    assert verifyObject(IBlob, blob)
    assert isinstance(blob, FileBlob)
    fd = blob.fileno()
    assert fd is not None
    assert os.pread(fd, 5, 0) == data[:5]
    assert result_of(blob.read(3, 10)) == data[3:13]
    assert result_of(blob.read(len(data) - 2, 10)) == data[-2:]
    assert result_of(blob.read(len(data), 10)) == b""
    assert client.reads == []
    (tmp_path / "big").write_bytes(b"x" * (3 * MAX_READ))
    big = FileBlob(os.open(tmp_path / "big", os.O_RDONLY), 3 * MAX_READ)
    assert len(result_of(big.read(0, 3 * MAX_READ))) == MAX_READ, "reads are capped"
    big.close()
    blob.close()
    blob.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    store.stopService()


def test_open_falls_back_to_grpc_when_the_file_is_out_of_reach(
    client: FakeClient, tmp_path: Any
) -> None:
    digests = demo(client)
    store = make_store(client, str(tmp_path / "not-there"))
    store.startService()
    blob = result_of(store.open(digests["layer"]))
    assert isinstance(blob, StreamBlob)
    assert blob.fileno() is None
    assert blob.size == len(client.blobs[digests["layer"]])
    with pytest.raises(NotFound):
        result_of(store.open(sha256(b"absent")))
    store.stopService()


def read_all(blob: Any, length: int) -> bytes:
    parts: list[bytes] = []
    position = 0
    while True:
        data = result_of(blob.read(position, length))
        if not data:
            return b"".join(parts)
        assert len(data) <= length
        parts.append(data)
        position += len(data)


@pytest.mark.parametrize("length", [1, 3, 7, 10, 1000])
def test_stream_blob_reads_sequentially_from_one_stream(
    store: ContainerdStore, client: FakeClient, length: int
) -> None:
    data = bytes(range(100))
    digest = client.add(data)
    blob = StreamBlob(store._call, client, digest, len(data))  # type: ignore[arg-type]
    assert read_all(blob, length) == data
    assert client.reads == [(digest, 0)]


def test_stream_blob_reopens_at_the_asked_offset(
    store: ContainerdStore, client: FakeClient
) -> None:
    data = bytes(range(100))
    digest = client.add(data)
    blob = StreamBlob(store._call, client, digest, len(data))  # type: ignore[arg-type]
    assert result_of(blob.read(0, 3)) == data[0:3]
    assert result_of(blob.read(5, 3)) == data[5:7], "within the buffered chunk"
    assert result_of(blob.read(50, 4)) == data[50:54]
    assert client.reads == [(digest, 0), (digest, 50)]
    assert [stream.cancelled for stream in client.streams] == [True, False], (
        "the stream at 0 is cancelled when the read jumps to 50, not left open"
    )
    assert result_of(blob.read(54, 100)) == data[54:57]
    assert result_of(blob.read(10, 2)) == data[10:12]
    assert client.reads[-1] == (digest, 10)
    assert result_of(blob.read(100, 5)) == b""
    blob.close()
    blob.close()
    with pytest.raises(ValueError):
        result_of(blob.read(0, 1))


def test_stream_blob_reports_a_short_stream(store: ContainerdStore, client: FakeClient) -> None:
    digest = client.add(b"short")
    blob = StreamBlob(store._call, client, digest, 10)  # type: ignore[arg-type]
    assert result_of(blob.read(0, 10)) == b"short"
    with pytest.raises(Unavailable):
        result_of(blob.read(5, 10))


def envelope_payloads(*events: tuple[str, str]) -> list[tuple[str, str, Any]]:
    kinds = {
        "/images/create": image_events_pb2.ImageCreate,
        "/images/update": image_events_pb2.ImageUpdate,
        "/images/delete": image_events_pb2.ImageDelete,
    }
    return [(topic, "k8s.io", kinds[topic](name=name)) for topic, name in events]


def test_events_reach_handlers_until_unsubscribed(client: FakeClient) -> None:
    client.next_events = [
        envelope_payloads(("/images/create", "a:1")),
        envelope_payloads(("/images/update", "a:1"), ("/images/delete", "a:1")),
    ]
    store = make_store(client)
    seen: list[ImageEvent] = []
    failing: list[ImageEvent] = []

    def broken(event: ImageEvent) -> None:
        failing.append(event)
        raise RuntimeError("handler bug")

    store.subscribe(broken)
    unsubscribe = store.subscribe(seen.append)
    with capturedLogs() as logs:
        store.startService()
    assert seen == [ImageEvent(ImageEventKind.CREATE, "a:1")]
    assert failing == seen, "a failing handler does not stop the others"
    assert any(e.get("log_failure") for e in logs)
    assert store.subscriptions == 1
    [ended] = [e for e in logs if "event stream ended" in e.get("log_format", "")]
    assert ended["log_level"] == LogLevel.warn, "a stream that delivered events broke: news"
    store._reactor.advance(0.5)
    assert store.subscriptions == 2
    assert seen[1:] == [
        ImageEvent(ImageEventKind.RESYNC, ""),
        ImageEvent(ImageEventKind.UPDATE, "a:1"),
        ImageEvent(ImageEventKind.DELETE, "a:1"),
    ], "a new stream after a broken one first says that events may have been missed"
    unsubscribe()
    unsubscribe()
    client.next_events = [envelope_payloads(("/images/create", "b:1"))]
    store._reactor.advance(0.5)
    assert len(seen) == 4
    store.stopService()


def test_resubscribes_with_backoff_and_stops_cleanly(client: FakeClient) -> None:
    readers: list[Callable[[], None]] = []  # threads that never get to run
    store = make_store(client, max_retry_delay=2.0, run_in_thread=readers.append)
    reactor = store._reactor
    client.down = True
    with capturedLogs() as logs:
        store.startService()
        assert store.subscriptions == 0
        for _ in range(4):
            reactor.advance(2.0)
    ended = [e for e in logs if "event stream ended" in e.get("log_format", "")]
    assert [e["delay"] for e in ended[:4]] == [0.5, 1.0, 2.0, 2.0]
    assert {e["log_level"] for e in ended} == {LogLevel.debug}, (
        "a stream that never worked is no news: the store warns once that containerd is down"
    )
    client.down = False
    reactor.advance(2.0)
    assert store.subscriptions == 1
    assert len(readers) == 1
    store.stopService()
    assert reactor.getDelayedCalls() == []
    assert client.subscriptions[-1].cancelled
    assert client.closed


def test_event_filters_name_the_namespace() -> None:
    assert event_filters("k8s.io") == [
        'topic~="^/images/",namespace=="k8s.io"',
        'topic=="/content/delete",namespace=="k8s.io"',
    ]


def test_envelopes_decode_to_image_events() -> None:
    from google.protobuf import any_pb2

    from spegel_tx.containerd.api import content_events_pb2, events_pb2

    payload = image_events_pb2.ImageDelete(name="docker.io/library/demo:v1")
    envelope = events_pb2.Envelope(
        topic="/images/delete",
        namespace="k8s.io",
        event=any_pb2.Any(
            type_url="containerd.services.images.v1.ImageDelete", value=payload.SerializeToString()
        ),
    )
    topic, namespace, message = decode_envelope(envelope)
    assert (topic, namespace, message) == ("/images/delete", "k8s.io", payload)
    assert to_image_event(topic, message) == ImageEvent(
        ImageEventKind.DELETE, "docker.io/library/demo:v1"
    )
    deleted = content_events_pb2.ContentDelete(digest="sha256:" + "a" * 64)
    assert to_image_event("/content/delete", deleted) is None
    unknown = events_pb2.Envelope(topic="/tasks/exit", event=any_pb2.Any(type_url="x.Y"))
    assert decode_envelope(unknown) == ("/tasks/exit", "", None)


# Downloads in progress (IDownloads)


def write_download(
    root: Any, digest: str, data: bytes, total: int, namespace: str = "k8s.io"
) -> Any:
    path = root / "ingest" / digest.split(":")[1][:12]
    path.mkdir(parents=True)
    (path / "ref").write_text(f"{namespace}/1/layer-{digest}")
    (path / "total").write_text(str(total))
    (path / "data").write_bytes(data)
    return path


def test_a_live_download_opens_as_a_blob_that_follows_it(client: FakeClient, tmp_path: Any) -> None:
    digest = sha256(b"a layer being downloaded")
    write_download(tmp_path, digest, b"a layer", 24)
    other = sha256(b"another namespace's")
    write_download(tmp_path, other, b"x", 10, namespace="moby")
    store = make_store(client, str(tmp_path))
    store.startService()

    assert list(result_of(store.downloads())) == [digest]
    blob = result_of(store.open_download(digest))
    assert blob.size == 24
    assert result_of(blob.read(0, 100)) == b"a layer"
    blob.close()
    with pytest.raises(NotFound):
        result_of(store.open_download(other))
    store.stopService()


def test_a_stalled_download_is_not_offered(client: FakeClient, tmp_path: Any) -> None:
    digest = sha256(b"stalled")
    path = write_download(tmp_path, digest, b"half", 8)
    stale = time.time() - 10
    os.utime(path / "data", (stale, stale))
    store = make_store(client, str(tmp_path), stall_timeout=3.0)
    store.startService()

    with pytest.raises(NotFound):
        result_of(store.open_download(digest))
    store.stopService()


def test_committed_asks_containerd_which_blobs_the_namespace_holds(
    client: FakeClient, tmp_path: Any
) -> None:
    held = client.add(b"committed here")
    elsewhere = sha256(b"another namespace's blob")
    write_blob(tmp_path, held, b"committed here")
    write_blob(tmp_path, elsewhere, b"another namespace's blob")
    store = make_store(client, str(tmp_path))
    store.startService()

    assert result_of(store.blob_files()) == {held, elsewhere}
    assert result_of(store.committed([held, elsewhere])) == {held}
    store.stopService()


def test_without_the_content_directory_nothing_is_downloading(client: FakeClient) -> None:
    store = make_store(client)
    store.startService()

    assert result_of(store.downloads()) == {}
    assert result_of(store.blob_files()) == set()
    with pytest.raises(NotFound):
        result_of(store.open_download(sha256(b"x")))
    store.watch_downloads(lambda: None)
    assert not store.watching
    store.stopService()
