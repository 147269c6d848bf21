"""Downloads in progress, read from files laid out as containerd 1.6 lays them out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from spegel_tx.containerd.ingests import blob_files, ingest_digest, open_data, scan_ingests
from spegel_tx.containerd.store import FOLLOW_INTERVAL, GrowingBlob, IngestEnded

HEX = "ab" * 32
DIGEST = "sha256:" + HEX


def write_ingest(root: Path, name: str, ref: str, total: int | None, data: bytes) -> Path:
    path = root / "ingest" / name
    path.mkdir(parents=True)
    (path / "ref").write_text(ref)
    if total is not None:
        (path / "total").write_text(str(total))
    (path / "data").write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("ref", "digest"),
    [
        (f"k8s.io/1/layer-{DIGEST}", DIGEST),
        (f"k8s.io/17/config-{DIGEST}", DIGEST),
        (f"k8s.io/2/manifest-{DIGEST}\n", DIGEST),
        (f"k8s.io/3/{DIGEST}", DIGEST),
        (f"moby/1/layer-{DIGEST}", None),  # another namespace's download
        ("k8s.io/1/import-2024-01-01", None),  # no digest: ctr's own imports
        (f"k8s.io/1/layer-sha256:{HEX[:-1]}", None),
        ("", None),
    ],
)
def test_the_digest_of_a_download_comes_from_its_ref(ref: str, digest: str | None) -> None:
    assert ingest_digest(ref, "k8s.io") == digest


def test_scan_lists_this_namespaces_downloads_with_a_known_size(tmp_path: Path) -> None:
    other = "sha256:" + "cd" * 32
    write_ingest(tmp_path, "one", f"k8s.io/1/layer-{DIGEST}", 100, b"x" * 40)
    write_ingest(tmp_path, "two", f"moby/1/layer-{other}", 100, b"x")
    write_ingest(tmp_path, "three", f"k8s.io/2/layer-{other}", None, b"x")  # size unknown
    (tmp_path / "ingest" / "being-made").mkdir()  # no ref yet

    found = scan_ingests(str(tmp_path), "k8s.io")

    assert list(found) == [DIGEST]
    assert (found[DIGEST].total, found[DIGEST].received) == (100, 40)


def test_scan_keeps_the_furthest_of_two_downloads_of_one_digest(tmp_path: Path) -> None:
    write_ingest(tmp_path, "one", f"k8s.io/1/layer-{DIGEST}", 100, b"x" * 10)
    write_ingest(tmp_path, "two", f"k8s.io/2/layer-{DIGEST}", 100, b"x" * 70)

    assert scan_ingests(str(tmp_path), "k8s.io")[DIGEST].received == 70


def test_no_content_directory_means_no_downloads_and_no_blobs(tmp_path: Path) -> None:
    assert scan_ingests(str(tmp_path / "absent"), "k8s.io") == {}
    assert blob_files(str(tmp_path / "absent")) == set()


def test_blob_files_are_the_digests_in_blobs_sha256(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (blobs / HEX).write_bytes(b"x")
    (blobs / "not-a-digest").write_bytes(b"x")

    assert blob_files(str(tmp_path)) == {DIGEST}


def test_a_download_is_live_while_it_grows(tmp_path: Path) -> None:
    write_ingest(tmp_path, "one", f"k8s.io/1/layer-{DIGEST}", 4, b"abcd")
    ingest = scan_ingests(str(tmp_path), "k8s.io")[DIGEST]

    assert ingest.live(ingest.updated + 2.9, 3.0)
    # Complete but never committed after the stall time: it failed its check.
    assert not ingest.live(ingest.updated + 3.0, 3.0)


class Following:
    """A GrowingBlob over a real ``data`` file that the test appends to."""

    def __init__(self, tmp_path: Path, size: int, stall: float = 3.0) -> None:
        self.clock = Clock()
        self.path = write_ingest(tmp_path, "one", f"k8s.io/1/layer-{DIGEST}", size, b"")
        ingest = scan_ingests(str(tmp_path), "k8s.io")[DIGEST]
        self.blob = GrowingBlob(self.clock, open_data(ingest), size, stall)

    def append(self, data: bytes) -> None:
        with open(self.path / "data", "ab") as f:
            f.write(data)

    def advance(self, seconds: float) -> None:
        steps = round(seconds / FOLLOW_INTERVAL)
        for _ in range(steps):
            self.clock.advance(FOLLOW_INTERVAL)


def test_a_read_gets_what_is_written_and_waits_for_the_rest(tmp_path: Path) -> None:
    follow = Following(tmp_path, 10)
    follow.append(b"hello")

    assert follow.blob.read(0, 100).result == b"hello"
    waiting = follow.blob.read(5, 100)
    assert not waiting.called
    follow.append(b"world")
    follow.advance(FOLLOW_INTERVAL)
    assert waiting.result == b"world"
    assert follow.blob.read(10, 100).result == b""  # the end: the size it was given
    follow.blob.close()


def test_the_same_descriptor_reads_on_after_the_commit_renames_data(tmp_path: Path) -> None:
    follow = Following(tmp_path, 6)
    follow.append(b"abc")
    follow.blob.read(0, 3)
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (follow.path / "data").rename(blobs / HEX)  # containerd's commit
    with open(blobs / HEX, "ab") as f:
        f.write(b"def")

    assert follow.blob.read(3, 100).result == b"def"
    follow.blob.close()


def test_a_download_that_stops_growing_ends_the_read(tmp_path: Path) -> None:
    follow = Following(tmp_path, 10, stall=1.0)
    follow.append(b"abc")
    follow.blob.read(0, 3)
    waiting = follow.blob.read(3, 7)

    follow.advance(0.9)
    assert not waiting.called
    follow.append(b"d")  # it grew: the stall clock starts over
    follow.advance(FOLLOW_INTERVAL)
    assert waiting.result == b"d"
    waiting = follow.blob.read(4, 6)
    follow.advance(1.0)

    failure = waiting.result
    waiting.addErrback(lambda _: None)
    assert isinstance(failure.value, IngestEnded)
    assert "stalled at 4 of 10 bytes" in str(failure.value)
    follow.blob.close()


def test_a_cancelled_download_ends_the_read_at_once(tmp_path: Path) -> None:
    follow = Following(tmp_path, 10)
    follow.append(b"abc")
    waiting = follow.blob.read(3, 7)
    os.unlink(follow.path / "data")  # containerd's Abort removes the ingest

    follow.advance(FOLLOW_INTERVAL)

    failure = waiting.result
    waiting.addErrback(lambda _: None)
    assert isinstance(failure.value, IngestEnded)
    assert "cancelled" in str(failure.value)
    follow.blob.close()


def test_closing_stops_a_waiting_read(tmp_path: Path) -> None:
    follow = Following(tmp_path, 10)
    waiting = follow.blob.read(0, 10)
    waiting.addErrback(lambda _: None)
    waiting.cancel()
    follow.blob.close()

    assert follow.clock.getDelayedCalls() == []
    assert follow.blob.read(0, 1).addErrback(lambda f: f.type).result is ValueError
