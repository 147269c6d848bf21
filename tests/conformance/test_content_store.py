"""One suite for every IContentStore: the in-memory one and ContainerdStore on a real containerd."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from spegel_tx.content import ImageEvent, ImageEventKind
from spegel_tx.errors import NotFound
from spegel_tx.interfaces import IBlob, IContentStore
from spegel_tx.oci.manifest import OCI_INDEX, OCI_MANIFEST
from spegel_tx.testing import MemoryStore

ABSENT = "sha256:" + "0" * 64


@dataclass
class Backend:
    """A store holding the demo image, and how to change its names from outside."""

    store: IContentStore
    image: object
    tag: Callable[[str], None]
    untag: Callable[[str], None]


@pytest.fixture(scope="module")
def memory_backend(demo_image):
    blobs = [demo_image.read_blob(digest) for digest in demo_image.media_types]
    store = MemoryStore(blobs, {demo_image.name: demo_image.index_digest})
    return Backend(
        store,
        demo_image,
        tag=lambda name: store.tag(name, demo_image.index_digest),
        untag=store.untag,
    )


@pytest.fixture(scope="module")
def containerd_backend(containerd, demo_image, containerd_store):
    return Backend(
        containerd_store,
        demo_image,
        tag=lambda name: containerd.ctr("images", "tag", demo_image.name, name),
        untag=lambda name: containerd.ctr("images", "rm", name),
    )


@pytest.fixture(params=["memory", "containerd"])
def backend(request) -> Backend:
    return request.getfixturevalue(f"{request.param}_backend")


def wait_for(d: Deferred, seconds: float = 10.0) -> Deferred:
    return d.addTimeout(seconds, reactor)


def test_provides_the_interface(backend):
    assert verifyObject(IContentStore, backend.store)
    assert backend.store.ready()


@pytest_twisted.ensureDeferred
async def test_images_and_resolve(backend):
    image = backend.image
    images = await backend.store.images()
    [found] = [i for i in images if i.name == image.name]
    assert (found.digest, found.media_type) == (image.index_digest, OCI_INDEX)
    assert await backend.store.resolve(image.name) == image.index_digest
    with pytest.raises(NotFound):
        await backend.store.resolve(image.name + "-absent")


@pytest_twisted.ensureDeferred
async def test_descriptors_tell_manifests_from_blobs(backend):
    image = backend.image
    index = await backend.store.descriptor(image.index_digest)
    manifest = await backend.store.descriptor(image.manifest_digest)
    layer = await backend.store.descriptor(image.layer_digests[0])
    assert (index.media_type, manifest.media_type) == (OCI_INDEX, OCI_MANIFEST)
    assert layer.media_type == "application/octet-stream"
    assert layer.size == len(image.read_blob(image.layer_digests[0]))
    with pytest.raises(NotFound):
        await backend.store.descriptor(ABSENT)


@pytest_twisted.ensureDeferred
async def test_open_reads_every_byte_from_any_offset(backend):
    image = backend.image
    digest = image.layer_digests[-1]
    expected = image.read_blob(digest)
    blob = await backend.store.open(digest)
    try:
        assert verifyObject(IBlob, blob)
        assert blob.size == len(expected)
        parts, position = [], 0
        while True:
            data = await blob.read(position, 1 << 20)
            if not data:
                break
            parts.append(data)
            position += len(data)
        assert b"".join(parts) == expected
        tail = await blob.read(len(expected) - 10, 100)
        assert tail == expected[-10:]
    finally:
        blob.close()
        blob.close()
    with pytest.raises(NotFound):
        await backend.store.open(ABSENT)


@pytest_twisted.ensureDeferred
async def test_digests_reach_every_present_piece(backend):
    image = backend.image
    [found] = [i for i in await backend.store.images() if i.name == image.name]
    digests = await backend.store.digests(found)
    assert sorted(digests) == sorted(
        [image.index_digest, image.manifest_digest, image.config_digest, *image.layer_digests]
    )


@pytest_twisted.ensureDeferred
async def test_subscribe_sees_names_come_and_go(backend):
    events: list[ImageEvent] = []
    seen: dict[ImageEventKind, Deferred] = {kind: Deferred() for kind in ImageEventKind}
    name = backend.image.name.rsplit(":", 1)[0] + ":conformance"

    def handler(event: ImageEvent) -> None:
        events.append(event)
        if event.name == name and not seen[event.kind].called:
            seen[event.kind].callback(event)

    unsubscribe = backend.store.subscribe(handler)
    try:
        backend.tag(name)
        await wait_for(seen[ImageEventKind.CREATE])
        assert await backend.store.resolve(name) == backend.image.index_digest
        backend.untag(name)
        await wait_for(seen[ImageEventKind.DELETE])
        with pytest.raises(NotFound):
            await backend.store.resolve(name)
    finally:
        unsubscribe()
    count = len(events)
    backend.tag(name)
    backend.untag(name)
    await deferLater(reactor, 0.5)
    assert len(events) == count, "no events after unsubscribing"
