"""What a node advertises of an image it is still pulling (``first-wave-sharing``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from spegel_tx.containerd.ingests import Ingest
from spegel_tx.content import FirstWave, in_flight_key
from spegel_tx.errors import NotFound
from spegel_tx.interfaces import IBlob, IDownloads
from spegel_tx.routing.memory import MemoryRoutingTable
from spegel_tx.state import DOWNLOAD_DEBOUNCE, DOWNLOAD_RESCAN, LANDED_KEEP, StateTracker
from spegel_tx.testing import MemoryStore

LAYER = "sha256:" + "1" * 64
CONFIG = "sha256:" + "2" * 64
OTHER_NAMESPACE = "sha256:" + "3" * 64


@implementer(IDownloads)
class DownloadingStore(MemoryStore):
    """A store whose containerd is downloading: the test sets the ingests and files."""

    stall_timeout = 3.0

    def __init__(self, wall: Callable[[], float]) -> None:
        super().__init__()
        self.wall = wall
        self.ingests: dict[str, Ingest] = {}
        self.files: set[str] = set()
        self.held: set[str] = set()
        self.listeners: list[Callable[[], None]] = []

    def start_download(self, digest: str, total: int = 100) -> None:
        self.ingests[digest] = Ingest(digest, total, 0, self.wall(), "/ingest/" + digest)
        self.changed()

    def commit(self, digest: str, namespace_holds: bool = True) -> None:
        self.ingests.pop(digest, None)
        self.files.add(digest)
        if namespace_holds:
            self.held.add(digest)
        self.changed()

    def changed(self) -> None:
        for listener in self.listeners:
            listener()

    def downloads(self) -> Deferred[dict[str, Ingest]]:
        return succeed(dict(self.ingests))

    def blob_files(self) -> Deferred[set[str]]:
        return succeed(set(self.files))

    def committed(self, digests: Iterable[str]) -> Deferred[set[str]]:
        return succeed(set(digests) & self.held)

    def open_download(self, digest: str) -> Deferred[IBlob]:
        raise NotFound(digest)

    watching = True

    def watch_downloads(self, changed: Callable[[], None]) -> None:
        self.listeners.append(changed)


class Node:
    def __init__(self, mode: FirstWave = FirstWave.IN_FLIGHT, on_disk: Iterable[str] = ()) -> None:
        """``on_disk``: blobs containerd holds before the node starts."""
        self.clock = Clock()
        self.wall = 1_000_000.0
        self.store = DownloadingStore(lambda: self.wall)
        self.store.files.update(on_disk)
        self.store.held.update(on_disk)
        self.table = MemoryRoutingTable()
        self.tracker = StateTracker(
            self.clock,
            self.store,
            self.table.router("10.0.0.1", 5000),
            first_wave=mode,
            wall=lambda: self.wall,
        )
        self.tracker.startService()

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.clock.advance(seconds)

    def advertised(self) -> set[str]:
        return {key for key, holders in self.table.holders.items() if holders}


def test_a_download_is_advertised_under_its_in_flight_key_within_the_debounce() -> None:
    node = Node()
    node.store.start_download(LAYER)

    node.advance(DOWNLOAD_DEBOUNCE)

    assert node.advertised() == {in_flight_key(LAYER)}
    assert node.tracker.first_wave_counts() == {"in_flight": 1, "committed": 0}


def test_a_committed_blob_is_advertised_under_its_digest_before_its_image() -> None:
    node = Node()
    node.store.start_download(LAYER)
    node.advance(DOWNLOAD_DEBOUNCE)
    node.store.commit(LAYER)

    node.advance(DOWNLOAD_DEBOUNCE)

    assert node.advertised() == {LAYER}, "the in-flight key goes once the blob is complete"


def test_a_blob_committed_between_two_looks_is_found_from_the_blob_directory() -> None:
    node = Node()
    node.store.commit(CONFIG)  # downloaded and committed within a millisecond
    node.store.commit(OTHER_NAMESPACE, namespace_holds=False)

    node.advance(DOWNLOAD_DEBOUNCE)

    assert node.advertised() == {CONFIG}


def test_blobs_on_disk_when_the_node_starts_are_left_to_the_image_walk() -> None:
    node = Node(on_disk=[CONFIG])

    node.advance(DOWNLOAD_RESCAN)

    assert node.advertised() == set(), "in no image: a leftover, not a pull in progress"


def test_a_stalled_download_is_withdrawn() -> None:
    node = Node()
    node.store.start_download(LAYER)
    node.advance(DOWNLOAD_DEBOUNCE)

    node.advance(node.store.stall_timeout + DOWNLOAD_RESCAN)

    assert node.advertised() == set()


def test_committed_mode_advertises_commits_but_no_downloads() -> None:
    node = Node(FirstWave.COMMITTED)
    node.store.start_download(LAYER)
    node.advance(DOWNLOAD_DEBOUNCE)
    assert node.advertised() == set()

    node.store.commit(LAYER)
    node.advance(DOWNLOAD_DEBOUNCE)
    assert node.advertised() == {LAYER}


def test_off_mode_advertises_nothing_before_the_image() -> None:
    node = Node(FirstWave.OFF)
    node.store.start_download(LAYER)
    node.store.commit(CONFIG)

    node.advance(LANDED_KEEP)

    assert node.advertised() == set()
    assert node.store.listeners == [], "nothing watches containerd's directories"


def test_a_committed_blob_no_image_claims_is_withdrawn_after_the_pull_window() -> None:
    node = Node()
    node.store.commit(CONFIG)
    node.advance(DOWNLOAD_DEBOUNCE)
    assert node.advertised() == {CONFIG}

    node.advance(LANDED_KEEP)
    node.tracker.resync_all()

    assert node.advertised() == set()


def test_a_committed_blob_that_is_deleted_is_withdrawn_with_the_next_image_listing() -> None:
    node = Node()
    node.store.commit(CONFIG)
    node.advance(DOWNLOAD_DEBOUNCE)
    node.store.held.discard(CONFIG)

    node.tracker.resync_all()

    assert node.advertised() == set()
