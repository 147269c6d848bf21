"""What a node advertises: exactly what its containerd holds, kept so as images come and go."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from twisted.internet.task import Clock

from spegel_tx.content import ImageEvent, ImageEventKind
from spegel_tx.routing.memory import MemoryRoutingTable
from spegel_tx.state import DEBOUNCE, NOT_READY_RETRY, StateTracker
from spegel_tx.testing import MemoryStore


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}


class Image:
    """index → manifest → config + layer, with the bytes of each, and one platform
    manifest named by the index but absent, as containerd keeps other platforms."""

    def __init__(self, seed: str) -> None:
        self.config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
        self.layer = f"layer {seed}".encode()
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": descriptor("application/vnd.oci.image.config.v1+json", self.config),
                "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", self.layer)],
            }
        ).encode()
        self.absent = f"arm64 manifest {seed}".encode()
        self.index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    descriptor("application/vnd.oci.image.manifest.v1+json", self.manifest),
                    descriptor("application/vnd.oci.image.manifest.v1+json", self.absent),
                ],
            }
        ).encode()

    def present(self) -> list[bytes]:
        return [self.index, self.manifest, self.config, self.layer]

    def digests(self) -> set[str]:
        return {digest_of(data) for data in self.present()}


class Node:
    def __init__(self, store: MemoryStore, **options: object) -> None:
        self.clock = Clock()
        self.table = MemoryRoutingTable()
        self.router = self.table.router("10.0.0.1", 5000)
        self.tracker = StateTracker(self.clock, store, self.router, **options)  # type: ignore[arg-type]
        self.tracker.startService()

    def advertised(self) -> set[str]:
        return {key for key, holders in self.table.holders.items() if holders}


def store_with(*images: tuple[str, Image]) -> MemoryStore:
    store = MemoryStore()
    for name, image in images:
        for data in image.present():
            store.add_blob(data)
        store.tag(name, digest_of(image.index))
    return store


def test_at_start_every_tag_and_every_present_digest_is_advertised() -> None:
    image = Image("a")
    store = store_with(("docker.io/library/a:1", image))
    store.tag("sha256:" + "c" * 64, digest_of(image.index))  # CRI's config-id name

    node = Node(store)

    assert node.advertised() == {"docker.io/library/a:1"} | image.digests()
    assert digest_of(image.absent) not in node.advertised(), "missing content is not offered"


def test_advertised_counts_per_registry_for_spegels_gauges() -> None:
    shared, alone = Image("shared"), Image("alone")
    store = store_with(
        ("docker.io/library/shared:1", shared),
        ("docker.io/library/shared:latest", shared),
        ("quay.io/org/shared:1", shared),
        ("quay.io/org/alone:1", alone),
    )

    node = Node(store)

    assert node.tracker.advertised_by_registry() == {
        "docker.io": (2, 1, len(shared.digests())),
        "quay.io": (2, 2, len(shared.digests()) + len(alone.digests())),
    }


def test_filters_and_mirrored_registries_limit_what_is_advertised() -> None:
    kept, filtered, other = Image("kept"), Image("filtered"), Image("other")
    store = store_with(
        ("docker.io/library/kept:1", kept),
        ("docker.io/library/filtered:latest", filtered),
        ("quay.io/org/other:1", other),
    )

    node = Node(
        store, mirrored_registries=["docker.io"], registry_filters=[re.compile(r":latest$")]
    )

    assert node.advertised() == {"docker.io/library/kept:1"} | kept.digests()


def test_a_new_image_is_advertised_once_its_burst_of_events_settles() -> None:
    store = store_with()
    node = Node(store)
    image = Image("b")
    for data in image.present():
        store.add_blob(data)
    store.tag("docker.io/library/b:1", digest_of(image.index))
    store.tag("docker.io/library/b:2", digest_of(image.index))

    assert node.advertised() == set(), "events are gathered for a moment"
    node.clock.advance(DEBOUNCE)

    assert node.advertised() == {"docker.io/library/b:1", "docker.io/library/b:2"} | image.digests()


def test_a_deleted_image_is_withdrawn_but_shared_content_stays() -> None:
    first, second = Image("1"), Image("2")
    store = store_with(("docker.io/library/x:1", first), ("docker.io/library/x:2", second))
    store.tag("docker.io/library/y:1", digest_of(first.index))
    node = Node(store)

    store.untag("docker.io/library/x:2")
    store.untag("docker.io/library/x:1")
    node.clock.advance(DEBOUNCE)

    assert node.advertised() == {"docker.io/library/y:1"} | first.digests()


def test_a_resync_event_repairs_what_was_missed() -> None:
    image = Image("m")
    store = store_with(("docker.io/library/m:1", image))
    node = Node(store)
    # Changes made while the event stream was down: no events reach the tracker.
    del store.names["docker.io/library/m:1"]

    node.tracker._changed(ImageEvent(ImageEventKind.RESYNC, ""))
    node.clock.advance(DEBOUNCE)

    assert node.advertised() == set()


def test_nothing_is_advertised_or_withdrawn_while_containerd_is_down() -> None:
    image = Image("d")
    store = store_with(("docker.io/library/d:1", image))
    store.is_ready = False
    node = Node(store)
    assert node.advertised() == set()

    store.is_ready = True
    node.clock.advance(NOT_READY_RETRY)

    assert node.advertised() == {"docker.io/library/d:1"} | image.digests()
    store.is_ready = False
    node.tracker.resync()
    assert node.advertised() == {"docker.io/library/d:1"} | image.digests(), (
        "a containerd restart does not make the node withdraw what it still holds"
    )


def test_stopping_ends_its_timers() -> None:
    store = store_with(("docker.io/library/s:1", Image("s")))
    node = Node(store)

    node.tracker.stopService()

    assert node.clock.getDelayedCalls() == []


class CountingStore(MemoryStore):
    """Counts content walks: each is a read of every manifest under an image."""

    def __init__(self) -> None:
        super().__init__()
        self.walks: list[str] = []

    def digests(self, image: Any) -> Any:
        self.walks.append(image.name)
        return super().digests(image)


def test_an_event_walks_only_images_not_walked_before() -> None:
    old, new = Image("old"), Image("new")
    store = CountingStore()
    for data in old.present() + new.present():
        store.add_blob(data)
    store.tag("docker.io/library/old:1", digest_of(old.index))
    node = Node(store)
    assert store.walks == ["docker.io/library/old:1"]

    store.tag("docker.io/library/new:1", digest_of(new.index))
    node.clock.advance(DEBOUNCE)

    assert store.walks[1:] == ["docker.io/library/new:1"], "the old image's content is known"
    assert node.advertised() >= old.digests() | new.digests()


def test_a_full_resync_walks_everything_again_and_sees_content_removed() -> None:
    image = Image("gc")
    store = CountingStore()
    for data in image.present():
        store.add_blob(data)
    store.tag("docker.io/library/gc:1", digest_of(image.index))
    node = Node(store)
    del store.blobs[digest_of(image.layer)]  # garbage-collected under a live image

    node.tracker._changed(ImageEvent(ImageEventKind.RESYNC, ""))
    node.clock.advance(DEBOUNCE)
    assert len(store.walks) == 2
    assert digest_of(image.layer) not in node.advertised()

    node.tracker.resync_all()
    assert len(store.walks) == 3, "the periodic resync walks again too"
