"""The first wave: node B pulls a new image while node A is still downloading it.

Real nodes (containerd, ``twistd -n spegel``) reach the upstream through a
``Throttle`` (tests/support/throttle.py), one slow uplink for all of them, so
A's download of the 105 MiB image lasts seconds and B can start in the middle.
Each scenario starts with neither A nor B holding the image.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.support.cluster import (
    MiB,
    MirrorCluster,
    SpegelNode,
    running_cluster,
    sha256_file,
    start_without,
)
from tests.support.ociimage import SyntheticImage

pytestmark = pytest.mark.integration

UPLINK = 24 * MiB
"""Bytes a second the upstream sends, to all nodes together: the big image takes A
about 4.5 s alone."""

PULL_BOUND = 90.0
"""Seconds any pull here may take before the test fails: a hang, not slowness."""


@pytest.fixture(scope="module")
def wave(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MirrorCluster]:
    """Nodes A and B and C behind one throttled uplink, default configuration
    (``first-wave-sharing: in-flight``)."""
    require("containerd", "ctr", "docker-registry", "skopeo")
    with running_cluster(tmp_path_factory.mktemp("first-wave"), upstream_rate=UPLINK) as cluster:
        yield cluster


def start_pull(node: SpegelNode, image: SyntheticImage) -> subprocess.Popen[str]:
    return subprocess.Popen(
        node.pull_command(image.name), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(pull: subprocess.Popen[str], node: SpegelNode) -> str:
    output, _ = pull.communicate(timeout=PULL_BOUND)
    assert pull.returncode == 0, f"{node} could not pull: {output}\n{node.log_tail()}"
    return output


def blob_gets(cluster: MirrorCluster, since: int) -> Counter[str]:
    """How often the upstream sent each blob (whole or a range) since ``since``."""
    sent: Counter[str] = Counter()
    for request in cluster.upstream.requests(since):
        if request.method == "GET" and "/blobs/" in request.uri and request.status in (200, 206):
            sent[request.uri.rsplit("/", 1)[1].split("?")[0]] += 1
    return sent


def assert_holds_the_real_image(node: SpegelNode, image: SyntheticImage) -> None:
    assert node.image_digest(image.name) == image.index_digest
    for digest in image.layer_digests:
        assert sha256_file(node.blob_path(digest)) == digest, f"{node} holds a bad {digest}"


def test_b_gets_each_blob_from_a_while_a_is_downloading_it(wave: MirrorCluster) -> None:
    a, b, big = wave.a, wave.b, wave.big
    for node in (a, b):
        start_without(node, big)
    since, a_since, b_since = wave.upstream.log_offset(), a.log_offset(), b.log_offset()
    a_pull = start_pull(a, big)
    started = time.monotonic()
    biggest = big.layer_digests[0]
    a.wait_for_ingest(biggest, MiB, a_pull, PULL_BOUND)
    b_pull = start_pull(b, big)
    # B is following: its copy of the big layer grows while A's is still a download.
    b.wait_for_ingest(biggest, 4 * MiB, b_pull, PULL_BOUND)
    assert any(i.is_for(biggest) for i in a.ingests()), "A finished before B started"
    finish(a_pull, a)
    a_seconds = time.monotonic() - started
    finish(b_pull, b)
    b_seconds = time.monotonic() - started

    sent = blob_gets(wave, since)
    print(f"A pulled in {a_seconds:.1f} s, B (starting during A's download) by {b_seconds:.1f} s")
    print(f"upstream blob GETs: {dict(sent)}; bytes sent {wave.throttle and wave.throttle.sent()}")
    for digest in [big.config_digest, *big.layer_digests]:
        assert sent[digest] == 1, f"the upstream sent {digest} {sent[digest]} times"
    assert_holds_the_real_image(b, big)

    in_flight = [r for r in a.access_log(a_since) if r["handler"] == "in-flight"]
    assert any(biggest in r["path"] and r["status"] == 200 for r in in_flight), in_flight
    from_a = {r["path"].rsplit("/", 1)[1].split("?")[0] for r in b.access_log(b_since)
              if r["handler"] == "mirror" and r["status"] == 200}  # fmt: skip
    assert set(big.layer_digests) <= from_a
    assert a.metrics().value("spegel_tx_in_flight_responses_total", completed="true") >= 1
    events = b.metrics()
    assert events.value("spegel_tx_mirror_peer_events_total", event="followed_download") >= 1


def test_an_abandoned_download_sends_b_to_the_upstream_without_hanging(
    wave: MirrorCluster,
) -> None:
    a, b, big = wave.a, wave.b, wave.big
    for node in (a, b):
        start_without(node, big)
    since = wave.upstream.log_offset()
    biggest = big.layer_digests[0]
    a_pull = start_pull(a, big)
    a.wait_for_ingest(biggest, 8 * MiB, a_pull, PULL_BOUND)
    b_pull = start_pull(b, big)
    b.wait_for_ingest(biggest, 2 * MiB, b_pull, PULL_BOUND)
    # ctr fetches in its own process: killing it abandons A's download where it stands.
    a_pull.kill()
    a_pull.wait()
    abandoned = time.monotonic()
    finish(b_pull, b)
    print(f"B finished {time.monotonic() - abandoned:.1f} s after A's pull was killed")
    assert_holds_the_real_image(b, big)
    assert wave.upstream.requests(since), "the upstream was never asked"
    assert blob_gets(wave, since)[biggest] >= 2, "B did not go to the upstream for the rest"
    assert a.metrics().value("spegel_tx_in_flight_responses_total", completed="false") >= 1
    gave_up = b.metrics().value("spegel_tx_mirror_peer_events_total", event="download_gave_up")
    assert gave_up >= 1


def test_a_corrupted_download_is_caught_by_the_digest_check(wave: MirrorCluster) -> None:
    """A's download goes bad on disk while B follows it. B's node hashes the body as it
    passes and cuts it before its last bytes, so B's containerd never commits the bad
    blob. containerd keeps the partial download and fails to commit it on every later
    pull until it is removed: the README's troubleshooting says how."""
    a, b, big = wave.a, wave.b, wave.big
    for node in (a, b):
        start_without(node, big)
    biggest = big.layer_digests[0]
    before = b.metrics().value("spegel_tx_mirror_peer_events_total", event="digest_mismatch")
    a_pull = start_pull(a, big)
    a.wait_for_ingest(biggest, 4 * MiB, a_pull, PULL_BOUND)
    ingest = next(i for i in a.ingests() if i.is_for(biggest))
    with open(Path(ingest.path, "data"), "r+b") as data:
        data.write(bytes(4096))  # what a bad disk or a bug would leave: not the blob
        data.flush()
        os.fsync(data.fileno())
    b_pull = start_pull(b, big)
    a_pull.communicate(timeout=PULL_BOUND)
    b_output, _ = b_pull.communicate(timeout=PULL_BOUND)
    after = b.metrics().value("spegel_tx_mirror_peer_events_total", event="digest_mismatch")
    print(f"A's pull: {a_pull.returncode}; B's pull: {b_pull.returncode}; B's node saw "
          f"{after - before:g} digest mismatches")  # fmt: skip
    assert a_pull.returncode != 0, "A's containerd committed a corrupted blob"
    assert after > before, "B's node never saw the bad bytes"
    assert biggest not in b.content(), "B's containerd holds the blob after bad bytes"
    assert b_pull.returncode != 0, b_output
    assert "unexpected commit digest" in b_output
    # Once the partial download is gone, as an operator removes it, B pulls cleanly.
    start_without(b, big)
    b.pull(big.name, timeout=PULL_BOUND)
    assert_holds_the_real_image(b, big)
