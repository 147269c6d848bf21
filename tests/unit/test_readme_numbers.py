"""Every default and limit the README states, checked against the README's own number.

Each test first finds the README's sentence, then checks the code behaves by the number
written here, not by a constant imported from the code: changing either side alone
fails. The configuration table's defaults are checked by test_startup.py (the table
against ``--help``) and test_config_effect.py (each key reaching what it configures).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import treq
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from spegel_tx.content import Descriptor
from spegel_tx.metrics import RegistryLabels
from spegel_tx.oci.manifest import MAX_MANIFEST_SIZE
from spegel_tx.registry.mirror import ExpectedSizes
from spegel_tx.registry.peers import PeerHealth
from spegel_tx.registry.streaming import PUMP_CHUNK, RATE_WINDOW
from spegel_tx.routing.kademlia.limits import Limits
from spegel_tx.routing.kademlia.lookup import Search
from spegel_tx.routing.kademlia.messages import MAX_DATAGRAM
from spegel_tx.routing.kademlia.protocol import REPLAY_WINDOW, KademliaProtocol
from spegel_tx.routing.kademlia.table import RoutingTable
from spegel_tx.state import StateTracker
from tests.unit.test_mirror import (
    BLOB_PATH,
    LAYER,
    LAYER_DIGEST,
    NAME,
    NS,
    Node,
    Peers,
    Scripted,
    fired,
    peer_registry,
    result_of,
)
from tests.unit.test_state import CountingStore, Image, digest_of
from tests.unit.test_state import Node as TrackerNode

README = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
PEER = ("10.0.0.2", 5000)


def says(sentence: str) -> None:
    """The README still says ``sentence`` (white space as in running text)."""
    assert " ".join(sentence.split()) in README, f"the README no longer says: {sentence}"


class TimedPeers(Peers):
    """Peers that note when each request was sent, on the node's clock."""

    clock: Clock

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def request(self, method: str, url: str, **kwargs: object) -> object:
        self.times.append(self.clock.seconds())
        return super().request(method, url, **kwargs)


# How a pull is served


def test_a_slow_first_provider_is_raced_after_100_ms_until_64_samples_are_in() -> None:
    says("(learned from the last 64 forwards; 100 ms until then)")
    peers = Peers()
    peers.add("10.0.0.2:5000", Scripted(hang=True))
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]})
    response_d = node.get(BLOB_PATH)
    node.advance(0.099)
    assert peers.asked() == ["10.0.0.2:5000"]
    node.advance(0.001)
    assert peers.asked() == ["10.0.0.2:5000", "10.0.0.3:5000"]
    assert node.body(response_d)[1] == LAYER


def test_the_hedge_delay_is_twice_the_90th_percentile_of_the_last_64() -> None:
    says("slower than twice the recent 90th-percentile response time")
    health = PeerHealth(Clock())
    for _ in range(8):
        health.answered(0.3)
    for _ in range(56):
        health.answered(0.05)
    assert health.hedge_delay() == pytest.approx(0.6), "8 of 64 at 300 ms: the p90 is 300 ms"
    health.answered(0.05)
    assert health.hedge_delay() == pytest.approx(0.1), "the 65th sample pushes one out"


def test_head_and_manifests_get_404_after_3_s_whatever_happens() -> None:
    says("HEAD and manifest requests get 404 after 3 s whatever happens")
    peers = Peers()
    peers.add("10.0.0.2:5000", Scripted(hang=True))
    # A peer given a minute for its headers: only the 3 s budget can end the wait.
    node = Node(peers, {NAME: ["10.0.0.2:5000"]}, response_timeout=60.0)
    response_d = node.get(f"/v2/library/demo/manifests/v1?ns={NS}", "HEAD")
    node.advance(2.99)
    assert not fired(response_d)
    node.advance(0.01)
    assert result_of(response_d).code == 404


def test_a_wrong_digest_cuts_the_client_off_and_puts_the_peer_last_for_10_minutes() -> None:
    says("on a mismatch the client's connection is cut")
    says("the peer is tried last for\n   10 minutes")
    forged = bytearray(LAYER)
    forged[-1] ^= 0xFF
    peers = Peers()
    peers.add("10.0.0.2:5000", Scripted(data=bytes(forged)))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]})
    assert isinstance(node.download(BLOB_PATH), Failure)
    node.mirror.health.alive(PEER)
    node.clock.advance(10 * 60 - 0.01)
    assert node.mirror.health.quarantined(PEER)
    node.clock.advance(0.01)
    assert not node.mirror.health.quarantined(PEER), "the quarantine ends"


def test_a_peer_that_refused_is_tried_last_for_30_s_then_first_again() -> None:
    says("| `mirror-peer-quarantine` | `MIRROR_PEER_QUARANTINE` | `30s` |")
    peers = Peers()  # 10.0.0.2 refuses: nothing listens there
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]})
    assert node.download(BLOB_PATH) == LAYER
    node.clock.advance(30 - 0.01)
    node.download(BLOB_PATH)
    assert peers.asked()[-1] == "10.0.0.3:5000", "still last: asked only the other"
    node.clock.advance(0.01)
    node.download(BLOB_PATH)
    assert peers.asked()[-2] == "10.0.0.2:5000", "the quarantine is over: asked first again"


def test_a_body_nobody_can_resume_is_retried_after_0_1_0_2_0_4_to_1_s_for_10_s() -> None:
    says("every provider found is asked again after 0.1, 0.2, 0.4 ... 1 s, for up to")
    says("`mirror-resume-timeout` (10 s)")
    peers = TimedPeers()
    peers.add("10.0.0.2:5000", Scripted(cut=1000))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]})
    peers.clock = node.clock
    response = result_of(node.get(BLOB_PATH))
    del peers.stubs["10.0.0.2:5000"]  # it died after the first 1000 bytes
    content = treq.content(response)
    node.settle()
    while not fired(content) and node.clock.seconds() < 60:
        due = min(call.getTime() for call in node.clock.getDelayedCalls())
        node.advance(due - node.clock.seconds())  # to the next timer exactly
    assert isinstance(result_of(content), Failure)
    # The body broke at 0 s, in the first request; every later request is a resume.
    pauses = [round(b - a, 6) for a, b in zip(peers.times, peers.times[1:], strict=False)]
    assert pauses[:5] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert set(pauses[5:-1]) == {1.0}, "at most 1 s apart"
    assert peers.times[-1] == pytest.approx(10.0), "the last try at the 10 s deadline"
    assert node.clock.seconds() == pytest.approx(10.0), "cut off after 10 s"


def test_the_throughput_floor_is_averaged_over_10_s() -> None:
    says("Bytes a second a peer's body must average over each 10 s in which the client")
    assert RATE_WINDOW == 10.0


# What a node trusts a peer with


def test_a_manifest_may_declare_no_more_than_4_mib() -> None:
    says("a manifest may not declare more than 4 MiB")
    assert MAX_MANIFEST_SIZE == 4 * 1024 * 1024


def test_the_sizes_of_the_last_100000_verified_blobs_are_remembered() -> None:
    says("(the node remembers the last 100,000 such sizes)")
    sizes = ExpectedSizes()
    digests = [f"sha256:{n:064x}" for n in range(100_001)]
    sizes.learn([Descriptor(digest, "application/octet-stream", 1) for digest in digests])
    assert sizes.get(digests[0]) is None
    assert sizes.get(digests[1]) == 1


# Stopping a node, and what a node advertises


def test_a_full_walk_of_every_image_runs_every_5_minutes() -> None:
    says("A full walk of every image runs every 5 minutes")
    image = Image("walked")
    store = CountingStore()
    for data in image.present():
        store.add_blob(data)
    store.tag("docker.io/library/walked:1", digest_of(image.index))
    node = TrackerNode(store)
    assert isinstance(node.tracker, StateTracker)
    walks = len(store.walks)
    node.clock.advance(5 * 60 - 0.01)
    assert len(store.walks) == walks
    node.clock.advance(0.01)
    assert len(store.walks) == walks + 1


# The DHT


def test_the_dhts_numbers() -> None:
    says("k = 20, lookups three requests at a time")
    says("One IP address holds at most 2 contacts in a routing table and 2 candidates")
    says(
        "(128 KiB at once, refilled at 16 KiB/s) and for all addresses together (1 MiB, 256 KiB/s)"
    )
    says("at most 1,232 bytes so no datagram is fragmented")
    says("as is one replayed as is within a minute (`dropped_replay`)")
    protocol = KademliaProtocol(Clock(), bytes(32), 5000)
    assert protocol.k == 20
    assert isinstance(protocol.table, RoutingTable) and protocol.table.k == 20
    assert Search(protocol, bytes(32), False, 0)._alpha == 3
    limits = Limits()
    assert limits.contacts_per_host == 2
    assert (limits.answer_burst, limits.answer_rate) == (128 * 1024, 16 * 1024)
    assert (limits.answer_burst_total, limits.answer_rate_total) == (1024 * 1024, 256 * 1024)
    assert MAX_DATAGRAM == 1232
    assert REPLAY_WINDOW == 60.0


# Metrics and the debug pages


def test_the_first_50_registries_keep_their_names() -> None:
    says("the first 50 registries the node sees keep their names and later ones are `other`")
    labels = RegistryLabels()
    names = [labels(f"r{n}.example") for n in range(51)]
    assert names[:50] == [f"r{n}.example" for n in range(50)]
    assert names[50] == "other"


def test_blobs_stream_in_1_mib_chunks() -> None:
    says("or streamed in 1 MiB chunks with backpressure otherwise")
    assert PUMP_CHUNK == 1024 * 1024
