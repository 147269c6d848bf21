"""ContainerdClient and ContainerdStore against a real containerd.

The session's containerd (tests/conftest.py) holds the demo image; the
restart test kills its containerd, so it gets one to itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from spegel_tx.containerd.client import ContainerdClient
from spegel_tx.containerd.store import ContainerdStore, FileBlob, StreamBlob
from spegel_tx.content import ImageEvent, ImageEventKind
from spegel_tx.errors import NotFound, Unavailable
from spegel_tx.oci.manifest import OCI_INDEX, OCI_MANIFEST
from tests.conftest import require
from tests.support.containerd import Containerd, running_containerd
from tests.support.ociimage import SyntheticImage

pytestmark = pytest.mark.integration

NAMESPACE = "k8s.io"


def largest_layer(image: SyntheticImage) -> str:
    """The largest layer: bigger than one gRPC Read chunk."""
    return max(image.layer_digests, key=image.size)


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("timed out waiting")
        await deferLater(reactor, 0.05)


async def started_store(address: str, content_path: str = "") -> ContainerdStore:
    store = ContainerdStore(reactor, address, NAMESPACE, content_path)
    store.startService()
    await wait_until(store.ready)
    return store


def test_client_reads_the_api(containerd: Containerd, demo_image: SyntheticImage) -> None:
    client = ContainerdClient(containerd.address, NAMESPACE)
    try:
        assert client.version().version.startswith(("1.", "2."))
        [content] = client.plugins(["type==io.containerd.content.v1,id==content"])
        assert content.exports["root"] == containerd.content_path
        image = client.get_image(demo_image.name)
        assert (image.target.digest, image.target.media_type) == (
            demo_image.index_digest,
            OCI_INDEX,
        )
        assert demo_image.name in [i.name for i in client.list_images()]
        layer = demo_image.read_blob(largest_layer(demo_image))
        assert client.content_info(largest_layer(demo_image)).size == len(layer)
        present = {info.digest for info in client.list_content()}
        assert set(demo_image.digests) <= present
        chunks = list(client.read_content(largest_layer(demo_image)))
        assert len(chunks) > 1
        assert b"".join(chunks) == layer
        assert b"".join(client.read_content(largest_layer(demo_image), 100, 50)) == layer[100:150]
        with pytest.raises(NotFound):
            client.get_image("docker.io/library/absent:v1")
        with pytest.raises(NotFound):
            client.content_info("sha256:" + "0" * 64)
        with pytest.raises(NotFound):
            list(client.read_content("sha256:" + "0" * 64))
    finally:
        client.close()
    nobody = ContainerdClient(str(containerd.base / "absent.sock"), NAMESPACE)
    try:
        with pytest.raises(Unavailable):
            nobody.version()
    finally:
        nobody.close()


@pytest_twisted.ensureDeferred
async def test_store_reads_images_from_disk(
    containerd: Containerd, demo_image: SyntheticImage
) -> None:
    store = await started_store(containerd.address)
    try:
        assert store.content_path == containerd.content_path
        assert await store.resolve(demo_image.name) == demo_image.index_digest
        with pytest.raises(NotFound):
            await store.resolve("docker.io/library/absent:v1")
        [image] = [i for i in await store.images() if i.name == demo_image.name]
        assert (image.digest, image.media_type) == (demo_image.index_digest, OCI_INDEX)
        assert sorted(await store.digests(image)) == sorted(demo_image.digests)
        for digest, media_type in [
            (demo_image.index_digest, OCI_INDEX),
            (demo_image.manifest_digest, OCI_MANIFEST),
            (demo_image.config_digest, "application/octet-stream"),
            (largest_layer(demo_image), "application/octet-stream"),
        ]:
            descriptor = await store.descriptor(digest)
            assert (descriptor.media_type, descriptor.size) == (media_type, demo_image.size(digest))
        layer = demo_image.read_blob(largest_layer(demo_image))
        blob = await store.open(largest_layer(demo_image))
        try:
            assert isinstance(blob, FileBlob)
            fd = blob.fileno()
            assert fd is not None
            assert os.fstat(fd).st_size == len(layer)
            assert await read_all(blob) == layer
        finally:
            blob.close()
        with pytest.raises(NotFound):
            await store.open("sha256:" + "0" * 64)
    finally:
        store.stopService()


async def read_all(blob: Any, length: int = 256 * 1024) -> bytes:
    parts: list[bytes] = []
    position = 0
    while True:
        data = await blob.read(position, length)
        if not data:
            return b"".join(parts)
        parts.append(data)
        position += len(data)


@pytest_twisted.ensureDeferred
async def test_store_falls_back_to_grpc(
    containerd: Containerd, demo_image: SyntheticImage, tmp_path: Path
) -> None:
    store = await started_store(containerd.address, str(tmp_path / "wrong"))
    try:
        descriptor = await store.descriptor(demo_image.manifest_digest)
        assert descriptor.media_type == OCI_MANIFEST
        [image] = [i for i in await store.images() if i.name == demo_image.name]
        assert sorted(await store.digests(image)) == sorted(demo_image.digests)
        layer = demo_image.read_blob(largest_layer(demo_image))
        blob = await store.open(largest_layer(demo_image))
        try:
            assert isinstance(blob, StreamBlob)
            assert blob.fileno() is None
            assert blob.size == len(layer)
            assert await read_all(blob) == layer
            assert await blob.read(len(layer) - 10, 100) == layer[-10:]
            assert await blob.read(12345, 100) == layer[12345:12445]
        finally:
            blob.close()
    finally:
        store.stopService()


class Events:
    """Collects image events and lets a test wait for one."""

    def __init__(self) -> None:
        self.seen: list[ImageEvent] = []

    def __call__(self, event: ImageEvent) -> None:
        self.seen.append(event)

    async def wait_for(self, kind: ImageEventKind, name: str, timeout: float = 20.0) -> None:
        await wait_until(lambda: ImageEvent(kind, name) in self.seen, timeout)


@pytest.fixture
def restartable_containerd(tmp_path: Path, demo_image: SyntheticImage) -> Iterator[Containerd]:
    """A containerd of its own: killing the session's one would disturb other tests."""
    require("containerd", "ctr")
    with running_containerd(tmp_path / "containerd", demo_image.archive) as containerd:
        yield containerd


@pytest_twisted.ensureDeferred
async def test_store_follows_a_containerd_restart(
    restartable_containerd: Containerd, demo_image: SyntheticImage
) -> None:
    containerd = restartable_containerd
    store = ContainerdStore(reactor, containerd.address, NAMESPACE, max_retry_delay=2.0)
    events = Events()
    store.subscribe(events)
    store.startService()
    try:
        await wait_until(store.ready)
        subscriptions = store.subscriptions
        containerd.kill()
        await wait_until(lambda: not store.ready())
        with pytest.raises(Unavailable):
            await store.resolve(demo_image.name)
        await deferLater(reactor, 1.0)
        containerd.start()
        await wait_until(store.ready)
        assert await store.resolve(demo_image.name)
        await wait_until(lambda: store.subscriptions > subscriptions)
        # A new stream only proves itself with an event: tag until one arrives.
        for attempt in range(40):
            name = f"docker.io/library/demo:after-restart-{attempt}"
            containerd.ctr("images", "tag", demo_image.name, name)
            try:
                await events.wait_for(ImageEventKind.CREATE, name, timeout=0.5)
                break
            except AssertionError:
                continue
        else:
            raise AssertionError("no event after containerd restarted")
    finally:
        store.stopService()
