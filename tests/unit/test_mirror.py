"""Forwarding to peers, through StubTreq on both sides and one task.Clock: no sockets.

The node under test is a real Registry over an empty memory store; its peers
are real Registry apps over memory stores holding the content, or scripted
resources that hang, stall, break off or lie about a digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import treq
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from spegel_tx.basicauth import AuthorizedClient, BasicAuth
from spegel_tx.content import in_flight_key
from spegel_tx.interfaces import ILookup
from spegel_tx.registry.app import Registry
from spegel_tx.registry.mirror import Mirror, MirrorSettings
from spegel_tx.registry.peers import DEFAULT_HEDGE_DELAY, PeerHealth
from spegel_tx.registry.streaming import PeerBodyRelay
from spegel_tx.routing.memory import MemoryRoutingTable
from spegel_tx.testing import MemoryStore

NS = "registry.test"
NAME = f"{NS}/library/demo:v1"
LAYER = os.urandom(300_000)
LAYER_DIGEST = "sha256:" + hashlib.sha256(LAYER).hexdigest()
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": LAYER_DIGEST,
            "size": 1,
        },
        "layers": [],
    }
).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
BLOB_PATH = f"/v2/library/demo/blobs/{LAYER_DIGEST}?ns={NS}"


class Scripted(Resource):
    """A peer that answers as told: hang before headers, send ``cut`` bytes of
    ``data`` and then stall or drop the connection, or send ``data`` whole."""

    isLeaf = True

    def __init__(
        self, data: bytes = LAYER, cut: int | None = None, stall: bool = False, hang: bool = False
    ) -> None:
        super().__init__()
        self.data = data
        self.cut = cut
        self.stall = stall
        self.hang = hang
        self.requests: list[Any] = []

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        if self.hang:
            return NOT_DONE_YET
        data = self.data
        wanted = request.getHeader(b"range")
        if wanted is not None:
            first_text, _, last_text = wanted.decode().removeprefix("bytes=").partition("-")
            first, last = int(first_text), int(last_text or len(data) - 1)
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {first}-{last}/{len(data)}".encode())
            data = data[first : last + 1]
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"docker-content-digest", LAYER_DIGEST.encode())
        request.setHeader(b"content-length", b"%d" % len(data))
        if self.cut is None:
            return data
        request.write(data[: self.cut])
        if not self.stall:
            request.channel.transport.loseConnection()
        return NOT_DONE_YET


class Peers:
    """A treq-like client whose requests reach one StubTreq per peer address;
    an address with no peer refuses the connection."""

    def __init__(self) -> None:
        self.stubs: dict[str, StubTreq] = {}
        self.sent: list[tuple[str, str, dict[bytes, list[bytes]]]] = []

    def add(self, address: str, resource: Resource) -> None:
        self.stubs[address] = StubTreq(resource)

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        address = urlsplit(url).netloc
        self.sent.append((address, method, dict(kwargs.get("headers") or {})))
        stub = self.stubs.get(address)
        if stub is None:
            return fail(ConnectionRefusedError(address))
        return stub.request(method, url, **kwargs)

    def flush(self) -> None:
        for stub in self.stubs.values():
            stub.flush()

    def asked(self) -> list[str]:
        return [address for address, _, _ in self.sent]


def peer_registry(*blobs: bytes, images: dict[str, str] | None = None) -> Resource:
    """A real spegel-tx registry holding ``blobs``: what a healthy peer runs."""
    return Registry(MemoryReactor(), MemoryStore(blobs, images)).resource()


class Node:
    """The node under test: nothing held locally, providers from a memory router."""

    def __init__(
        self,
        peers: Any,
        providers: dict[str, list[str]],
        registry: dict[str, Any] | None = None,
        store: MemoryStore | None = None,
        **settings: Any,
    ) -> None:
        """``registry``: options of the node's own Registry (filters, auth)."""
        self.clock = Clock()
        self.peers = peers
        table = MemoryRoutingTable()
        for key, addresses in providers.items():
            for address in addresses:
                host, port = address.rsplit(":", 1)
                table.router(host, int(port)).advertise([key])
        router = table.router("10.0.0.1", 5000)
        self.mirror = Mirror(self.clock, router, peers, MirrorSettings(**settings))
        registry = Registry(
            self.clock, store or MemoryStore(), mirror=self.mirror, **(registry or {})
        )
        self.client = StubTreq(registry.resource())

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, then deliver whatever that set moving."""
        self.clock.advance(seconds)
        self.settle()

    def settle(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            self.client.flush()
            self.peers.flush()

    def get(self, path: str, method: str = "GET", **headers: str) -> Deferred[Any]:
        sent = {
            name.replace("_", "-").encode(): [value.encode()] for name, value in headers.items()
        }
        d = self.client.request(method, f"http://node{path}", headers=sent)
        self.settle()
        return d

    def body(self, response_d: Deferred[Any]) -> Any:
        """The response and its body, or the Failure that reading it ended with."""
        response = result_of(response_d)
        content = treq.content(response)
        self.settle()
        return response, result_of(content)

    def download(self, path: str) -> bytes | Failure:
        """What a client ends up with: the whole body, or the Failure it saw."""
        response = result_of(self.get(path))
        if isinstance(response, Failure):
            return response
        return self.body(succeed(response))[1]


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def fired(d: Deferred[Any]) -> bool:
    results: list[Any] = []
    d.addBoth(lambda result: (results.append(result), result)[1])
    return bool(results)


def error_codes(body: bytes) -> list[str]:
    return [e["code"] for e in json.loads(body)["errors"]]


@pytest.fixture
def peers() -> Peers:
    return Peers()


def test_a_blob_held_by_a_peer_is_served_through_the_node(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]})

    response, body = node.body(node.get(BLOB_PATH))

    assert response.code == 200
    assert body == LAYER
    assert response.headers.getRawHeaders("docker-content-digest") == [LAYER_DIGEST]
    assert response.length == len(LAYER)
    address, method, headers = peers.sent[0]
    assert (address, method) == ("10.0.0.2:5000", "GET")
    assert headers[b"x-spegel-mirrored"] == [b"true"], "the peer must not forward again"
    assert node.mirror.counters["bytes_from_peers"] == len(LAYER)


def test_a_tag_is_resolved_by_a_peer_with_head(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", peer_registry(MANIFEST, images={NAME: MANIFEST_DIGEST}))
    node = Node(peers, {NAME: ["10.0.0.2:5000"]})

    response, body = node.body(node.get(f"/v2/library/demo/manifests/v1?ns={NS}", "HEAD"))

    assert response.code == 200
    assert body == b""
    assert response.headers.getRawHeaders("docker-content-digest") == [MANIFEST_DIGEST]
    assert response.headers.getRawHeaders("content-type") == [
        "application/vnd.oci.image.manifest.v1+json"
    ]
    assert response.headers.getRawHeaders("content-length") == [str(len(MANIFEST))]


def test_a_manifest_by_digest_comes_from_a_peer(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", peer_registry(MANIFEST))
    node = Node(peers, {MANIFEST_DIGEST: ["10.0.0.2:5000"]})

    response, body = node.body(node.get(f"/v2/library/demo/manifests/{MANIFEST_DIGEST}?ns={NS}"))

    assert (response.code, body) == (200, MANIFEST)


def test_nobody_holding_it_is_a_404_without_waiting(peers: Peers) -> None:
    node = Node(peers, {})

    response, body = node.body(node.get(BLOB_PATH))

    assert response.code == 404
    assert error_codes(body) == ["BLOB_UNKNOWN"]
    assert node.clock.seconds() == 0, "no timer had to run out"
    assert node.mirror.counters["not_found"] == 1


@implementer(ILookup)
class SilentLookup:
    """A DHT search that never finds anyone: only cancel ends it."""

    def __init__(self) -> None:
        self.waiting: list[Deferred[Any]] = []

    def next_provider(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.waiting.append(d)
        return d

    def cancel(self) -> None:
        for d in self.waiting:
            if not d.called:
                d.callback(None)

    def answering(self) -> bool:
        return False


def test_an_idle_lookup_ends_in_a_404_after_the_resolve_timeout(peers: Peers) -> None:
    node = Node(peers, {})
    node.mirror._router.lookup = lambda key, count: SilentLookup()  # type: ignore[method-assign]

    response_d = node.get(BLOB_PATH)
    node.advance(0.019)
    assert not fired(response_d), "still within mirror-resolve-timeout"
    node.advance(0.001)
    response, body = node.body(response_d)

    assert response.code == 404
    assert error_codes(body) == ["BLOB_UNKNOWN"]


def test_a_forwarded_request_is_never_forwarded_again(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]})

    response, _ = node.body(node.get(BLOB_PATH, x_spegel_mirrored="true"))

    assert response.code == 404
    assert peers.sent == []


def test_a_refusing_peer_is_skipped_now_and_by_later_requests(peers: Peers) -> None:
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]}, quarantine=30.0)

    first, body = node.body(node.get(BLOB_PATH))
    assert (first.code, body) == (200, LAYER)
    assert peers.asked() == ["10.0.0.2:5000", "10.0.0.3:5000"]

    second, _ = node.body(node.get(BLOB_PATH))
    assert second.code == 200
    assert peers.asked()[2:] == ["10.0.0.3:5000"], "the refusing peer is quarantined"

    node.clock.advance(30)
    node.body(node.get(BLOB_PATH))
    assert peers.asked()[3] == "10.0.0.2:5000", "tried again once the quarantine is over"


def test_a_peer_answering_404_is_passed_over_but_not_quarantined(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", peer_registry())
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]})

    response, body = node.body(node.get(BLOB_PATH))

    assert (response.code, body) == (200, LAYER)
    assert not node.mirror.health.quarantined(("10.0.0.2", 5000))


def test_all_providers_failing_is_a_404(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", peer_registry())
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]})

    response, body = node.body(node.get(BLOB_PATH))

    assert response.code == 404
    assert error_codes(body) == ["BLOB_UNKNOWN"]


def test_no_more_providers_are_tried_than_resolve_retries(peers: Peers) -> None:
    dead = [f"10.0.0.{n}:5000" for n in range(2, 7)]
    node = Node(peers, {LAYER_DIGEST: dead}, resolve_retries=3)

    response, _ = node.body(node.get(BLOB_PATH))

    assert response.code == 404
    assert len(peers.sent) == 3


def test_a_silent_peer_is_raced_by_the_next_after_the_hedge_delay(peers: Peers) -> None:
    silent = Scripted(hang=True)
    peers.add("10.0.0.2:5000", silent)
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]})

    response_d = node.get(BLOB_PATH)
    assert peers.asked() == ["10.0.0.2:5000"]
    node.advance(DEFAULT_HEDGE_DELAY)
    response, body = node.body(response_d)

    assert (response.code, body) == (200, LAYER)
    assert peers.asked() == ["10.0.0.2:5000", "10.0.0.3:5000"]
    assert node.mirror.counters["hedged"] == 1
    assert silent.requests[0]._disconnected, "the losing request is cancelled"


class SlowOnce(Resource):
    """A healthy peer registry whose first request gets no answer."""

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self.inner = inner
        self.requests = 0

    def render(self, request: Any) -> Any:
        self.requests += 1
        if self.requests == 1:
            return NOT_DONE_YET
        return self.inner.render(request)


def test_the_provider_that_lost_a_hedge_race_can_still_resume_the_body(peers: Peers) -> None:
    slow = SlowOnce(peer_registry(LAYER))
    peers.add("10.0.0.2:5000", slow)
    peers.add("10.0.0.3:5000", Scripted(cut=100_000))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]}, resolve_retries=2)

    response_d = node.get(BLOB_PATH)
    node.advance(DEFAULT_HEDGE_DELAY)
    response, body = node.body(response_d)

    assert (response.code, body) == (200, LAYER)
    assert peers.asked() == ["10.0.0.2:5000", "10.0.0.3:5000", "10.0.0.2:5000"]
    assert peers.sent[2][2][b"range"] == [b"bytes=100000-%d" % (len(LAYER) - 1)]


def test_a_peer_without_headers_in_time_fails_and_is_quarantined(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", Scripted(hang=True))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]}, response_timeout=2.0)

    response_d = node.get(BLOB_PATH)
    node.advance(1.9)
    assert not fired(response_d)
    node.advance(0.1)
    response, _ = node.body(response_d)

    assert response.code == 404
    assert node.mirror.health.quarantined(("10.0.0.2", 5000))


def test_head_and_manifests_answer_404_once_their_budget_is_spent(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", Scripted(hang=True))
    node = Node(peers, {NAME: ["10.0.0.2:5000"]}, response_timeout=60.0, manifest_budget=3.0)

    response_d = node.get(f"/v2/library/demo/manifests/v1?ns={NS}", "HEAD")
    node.advance(2.9)
    assert not fired(response_d)
    node.advance(0.1)

    assert result_of(response_d).code == 404


def test_a_body_cut_off_midway_resumes_from_the_next_provider(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", Scripted(cut=100_000))
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]})

    response, body = node.body(node.get(BLOB_PATH))

    assert response.code == 200
    assert body == LAYER, "the client sees one whole body"
    resumed = peers.sent[1]
    assert resumed[0] == "10.0.0.3:5000"
    assert resumed[2][b"range"] == [b"bytes=100000-%d" % (len(LAYER) - 1)]
    assert node.mirror.counters["resumed"] == 1


def test_a_stalled_body_resumes_after_the_idle_timeout(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", Scripted(cut=50_000, stall=True))
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]}, idle_timeout=5.0)

    response_d = node.get(BLOB_PATH)
    response = result_of(response_d)
    content = treq.content(response)
    node.advance(4.9)
    assert not fired(content), "a pause shorter than the idle timeout is waited out"
    node.advance(0.1)

    assert result_of(content) == LAYER
    assert peers.sent[1][2][b"range"] == [b"bytes=50000-%d" % (len(LAYER) - 1)]


def test_a_client_range_is_honoured_through_the_forward(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]})

    response, body = node.body(node.get(BLOB_PATH, range="bytes=1000-1999"))

    assert response.code == 206
    assert body == LAYER[1000:2000]
    assert response.headers.getRawHeaders("content-range") == [f"bytes 1000-1999/{len(LAYER)}"]


def test_a_client_range_resumes_within_its_range(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", Scripted(cut=1000))
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]})

    response, body = node.body(node.get(BLOB_PATH, range="bytes=5000-9999"))

    assert response.code == 206
    assert body == LAYER[5000:10000]
    assert peers.sent[1][2][b"range"] == [b"bytes=6000-9999"]


def test_content_with_the_wrong_digest_never_reaches_the_client_whole(peers: Peers) -> None:
    forged = bytearray(LAYER)
    forged[-1] ^= 0xFF
    peers.add("10.0.0.2:5000", Scripted(data=bytes(forged)))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]}, digest_quarantine=600.0)

    assert isinstance(node.download(BLOB_PATH), Failure), "the client's connection is cut"
    assert node.mirror.counters["digest_mismatch"] == 1
    assert node.mirror.health.quarantined(("10.0.0.2", 5000))
    node.clock.advance(599)
    assert node.mirror.health.quarantined(("10.0.0.2", 5000))


def test_a_body_that_no_provider_can_finish_cuts_the_client_off_after_the_resume_wait(
    peers: Peers,
) -> None:
    peers.add("10.0.0.2:5000", Scripted(cut=1000))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]}, resume_timeout=10.0)
    response = result_of(node.get(BLOB_PATH))
    del peers.stubs["10.0.0.2:5000"]  # it died after the first 1000 bytes
    content = treq.content(response)
    node.settle()

    for _ in range(99):
        node.advance(0.1)
    assert not fired(content), "the client sees a pause while providers are asked again"
    node.advance(0.5)

    assert isinstance(result_of(content), Failure)
    assert peers.asked().count("10.0.0.2:5000") > 3, "the dead provider was asked again"


def test_a_body_resumes_from_its_own_provider_once_it_has_restarted(peers: Peers) -> None:
    """The only provider dies part-way and comes back 2 s later: the client gets it all."""
    peers.add("10.0.0.2:5000", Scripted(cut=100_000))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]}, resume_timeout=10.0)
    response = result_of(node.get(BLOB_PATH))
    del peers.stubs["10.0.0.2:5000"]
    content = treq.content(response)
    node.settle()
    for _ in range(20):
        node.advance(0.1)
    peers.add("10.0.0.2:5000", peer_registry(LAYER))
    for _ in range(10):
        node.advance(0.1)

    assert result_of(content) == LAYER
    assert peers.sent[-1][2][b"range"] == [b"bytes=100000-%d" % (len(LAYER) - 1)]
    assert not node.mirror.health.quarantined(("10.0.0.2", 5000)), "it answered: forgiven"


def test_a_quarantined_peer_is_tried_when_it_is_the_only_provider(peers: Peers) -> None:
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]}, quarantine=30.0)
    first, _ = node.body(node.get(BLOB_PATH))
    assert first.code == 404
    assert node.mirror.health.quarantined(("10.0.0.2", 5000))

    peers.add("10.0.0.2:5000", peer_registry(LAYER))  # restarted
    second, body = node.body(node.get(BLOB_PATH))

    assert (second.code, body) == (200, LAYER)
    assert not node.mirror.health.quarantined(("10.0.0.2", 5000))
    assert node.mirror.counters["quarantined_tried"] == 1


def test_a_peer_seen_alive_leaves_quarantine_at_once(peers: Peers) -> None:
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]}, quarantine=30.0)
    node.body(node.get(BLOB_PATH))
    assert node.mirror.health.quarantined(("10.0.0.2", 5000))

    node.mirror.health.alive(("10.0.0.2", 5000))  # its router spoke: it re-advertised
    peers.add("10.0.0.2:5000", peer_registry(LAYER))
    node.body(node.get(BLOB_PATH))

    assert peers.asked()[-1] == "10.0.0.2:5000", "first in line again"


def test_a_liar_stays_distrusted_though_seen_alive(peers: Peers) -> None:
    forged = bytearray(LAYER)
    forged[0] ^= 0xFF
    peers.add("10.0.0.2:5000", Scripted(data=bytes(forged)))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]}, digest_quarantine=600.0)
    node.download(BLOB_PATH)

    node.mirror.health.alive(("10.0.0.2", 5000))

    assert node.mirror.health.quarantined(("10.0.0.2", 5000))


def test_a_client_range_past_the_end_is_answered_416_and_costs_the_peer_nothing(
    peers: Peers,
) -> None:
    peers.add("10.0.0.2:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]})

    response, body = node.body(node.get(BLOB_PATH, range=f"bytes={len(LAYER) + 10}-"))

    assert response.code == 416
    assert error_codes(body) == ["SIZE_INVALID"]
    assert response.headers.getRawHeaders("content-range") == [f"bytes */{len(LAYER)}"]
    assert not node.mirror.health.quarantined(("10.0.0.2", 5000))
    assert node.download(BLOB_PATH) == LAYER
    assert peers.asked() == ["10.0.0.2:5000", "10.0.0.2:5000"]


def test_a_partial_answer_to_a_whole_request_is_refused_and_charged(peers: Peers) -> None:
    class Partial(Scripted):
        def render(self, request: Any) -> Any:
            request.requestHeaders.setRawHeaders(b"range", [b"bytes=0-99"])
            return super().render(request)

    peers.add("10.0.0.2:5000", Partial())
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]})

    assert node.download(BLOB_PATH) == LAYER
    assert node.mirror.health.quarantined(("10.0.0.2", 5000))


def test_the_hedge_delay_follows_recent_peer_latencies() -> None:
    health = PeerHealth(Clock())
    assert health.hedge_delay() == DEFAULT_HEDGE_DELAY, "too few samples to learn from"
    for latency in [0.002] * 17 + [0.050, 0.050, 0.400]:
        health.answered(latency)
    assert health.hedge_delay() == pytest.approx(0.1), "twice the 90th percentile (50 ms)"
    for _ in range(64):
        health.answered(0.0001)
    assert health.hedge_delay() == 0.01, "never below the floor"
    for _ in range(64):
        health.answered(5.0)
    assert health.hedge_delay() == 1.0, "never above the ceiling"


class FakeBody:
    """A peer response whose body arrives only when the test says, recording
    what the relay asks of the peer connection."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.calls: list[str] = []
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self)

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class ProducerRequest(DummyRequest):
    producer: Any = None
    channel = object()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def test_a_slow_client_pauses_the_peer_and_suspends_the_idle_timeout() -> None:
    clock = Clock()
    request = ProducerRequest([b""])
    relay = PeerBodyRelay(clock, request, idle_timeout=5.0)
    body = FakeBody(20)
    done = relay.pipe(body, 20)

    body.protocol.dataReceived(b"a" * 10)
    request.producer.pauseProducing()
    assert body.calls == ["pause"]
    clock.advance(60)
    assert body.calls == ["pause"], "a paused transfer is not idle"
    request.producer.resumeProducing()
    body.protocol.dataReceived(b"b" * 10)

    assert body.calls == ["pause", "resume"]
    assert result_of(done) is None
    relay.finish()
    assert b"".join(request.written) == b"a" * 10 + b"b" * 10
    assert request.producer is None


def test_a_client_that_goes_away_stops_the_peer() -> None:
    request = ProducerRequest([b""])
    relay = PeerBodyRelay(Clock(), request, idle_timeout=5.0)
    body = FakeBody(20)
    done = relay.pipe(body, 20)
    failures: list[Any] = []
    done.addErrback(failures.append)

    request.producer.stopProducing()

    assert body.calls == ["stop"]
    assert relay.client_gone and failures


def test_the_last_chunk_waits_for_the_digest_check() -> None:
    request = ProducerRequest([b""])
    relay = PeerBodyRelay(Clock(), request, idle_timeout=5.0, hasher=hashlib.sha256())
    body = FakeBody(6)
    relay.pipe(body, 6)
    body.protocol.dataReceived(b"abc")
    body.protocol.dataReceived(b"def")

    assert b"".join(request.written) == b"abc", "the last chunk is held"
    assert (
        relay.hasher is not None
        and relay.hasher.hexdigest() == hashlib.sha256(b"abcdef").hexdigest()
    )
    relay.finish()
    assert b"".join(request.written) == b"abcdef"


def test_a_node_that_forwards_is_ready_only_once_it_knows_a_peer(peers: Peers) -> None:
    alone = Node(peers, {})
    assert result_of(alone.get("/readyz")).code == 503
    with_peer = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]})
    assert result_of(with_peer.get("/readyz")).code == 200


class Trickle(Resource):
    """A peer that declares the whole layer and sends one byte every 4 s."""

    isLeaf = True

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock

    def render(self, request: Any) -> Any:
        request.setHeader(b"content-length", b"%d" % len(LAYER))
        request.setHeader(b"docker-content-digest", LAYER_DIGEST.encode())
        self.send(request, 0)
        return NOT_DONE_YET

    def send(self, request: Any, at: int) -> None:
        if request.finished or request._disconnected:
            return
        request.write(LAYER[at : at + 1])
        self.clock.callLater(4.0, self.send, request, at + 1)


def test_a_peer_that_trickles_is_left_for_the_next_after_one_pace_window(peers: Peers) -> None:
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]}, min_throughput=1e6)
    peers.add("10.0.0.2:5000", Trickle(node.clock))
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    peers.stubs.pop("10.0.0.3:5000")  # C is out while the first request goes to A
    response = result_of(node.get(BLOB_PATH))
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    content = treq.content(response)
    for _ in range(99):
        node.advance(0.1)
    assert not fired(content), "within the first window the trickle is tolerated"
    for _ in range(5):
        node.advance(0.1)

    assert result_of(content) == LAYER
    assert node.mirror.health.quarantined(("10.0.0.2", 5000))
    assert node.mirror.counters["resumed"] == 1


class Lying(Scripted):
    """Declares what it is told instead of the truth."""

    def __init__(self, headers: dict[bytes, bytes], code: int = 200, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lie = headers
        self.code = code

    def render(self, request: Any) -> Any:
        body = super().render(request)
        request.setResponseCode(self.code)
        for name, value in self.lie.items():
            request.setHeader(name, value)
        return body


@pytest.mark.parametrize(
    ("lie", "code"),
    [
        ({b"content-range": b"bytes 0-49/300000"}, 206),
        ({b"content-range": b"bytes 5-99/300000"}, 206),
    ],
)
def test_a_partial_answer_that_does_not_hold_what_it_says_is_refused(
    peers: Peers, lie: dict[bytes, bytes], code: int
) -> None:
    peers.add("10.0.0.2:5000", Lying(lie, code, data=LAYER))
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]})

    response, body = node.body(node.get(BLOB_PATH, range="bytes=0-99"))

    assert (response.code, body) == (206, LAYER[:100])
    assert node.mirror.health.quarantined(("10.0.0.2", 5000))


def test_a_manifest_larger_than_any_manifest_is_refused_before_a_byte_moves(
    peers: Peers,
) -> None:
    class Huge(Resource):
        isLeaf = True

        def render(self, request: Any) -> Any:
            request.setHeader(b"content-length", b"1000000000000")
            request.write(b"{")
            return NOT_DONE_YET

    peers.add("10.0.0.2:5000", Huge())
    peers.add("10.0.0.3:5000", peer_registry(MANIFEST))
    node = Node(peers, {MANIFEST_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]})

    response, body = node.body(node.get(f"/v2/library/demo/manifests/{MANIFEST_DIGEST}?ns={NS}"))

    assert (response.code, body) == (200, MANIFEST)
    assert node.mirror.health.quarantined(("10.0.0.2", 5000))


def test_a_resume_must_hold_exactly_the_missing_bytes(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", Scripted(cut=1000))
    peers.add("10.0.0.3:5000", Lying({b"content-range": b"bytes 1000-1999/300000"}, 206))
    peers.add("10.0.0.4:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000", "10.0.0.4:5000"]})

    assert node.download(BLOB_PATH) == LAYER
    assert node.mirror.health.quarantined(("10.0.0.3", 5000))


FORGED = MANIFEST.replace(b'"layers": []', b'"layers": [] ')
FORGED_DIGEST = "sha256:" + hashlib.sha256(FORGED).hexdigest()


def test_providers_that_disagree_on_a_tag_send_containerd_to_the_registry(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", peer_registry(FORGED, images={NAME: FORGED_DIGEST}))
    peers.add("10.0.0.3:5000", peer_registry(MANIFEST, images={NAME: MANIFEST_DIGEST}))
    node = Node(peers, {NAME: ["10.0.0.2:5000", "10.0.0.3:5000"]})

    response, _ = node.body(node.get(f"/v2/library/demo/manifests/v1?ns={NS}", "HEAD"))

    assert response.code == 404
    assert node.mirror.counters["tag_disagreement"] == 1


def test_providers_that_agree_on_a_tag_resolve_it(peers: Peers) -> None:
    for address in ("10.0.0.2:5000", "10.0.0.3:5000"):
        peers.add(address, peer_registry(MANIFEST, images={NAME: MANIFEST_DIGEST}))
    node = Node(peers, {NAME: ["10.0.0.2:5000", "10.0.0.3:5000"]})

    response, _ = node.body(node.get(f"/v2/library/demo/manifests/v1?ns={NS}", "HEAD"))

    assert response.code == 200
    assert response.headers.getRawHeaders("docker-content-digest") == [MANIFEST_DIGEST]
    assert sorted(peers.asked()) == ["10.0.0.2:5000", "10.0.0.3:5000"]


def test_a_trickling_peer_stays_last_though_seen_alive(peers: Peers) -> None:
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]}, min_throughput=1e6)
    peers.add("10.0.0.2:5000", Trickle(node.clock))
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    peers.stubs.pop("10.0.0.3:5000")
    response = result_of(node.get(BLOB_PATH))
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    content = treq.content(response)
    for _ in range(105):
        node.advance(0.1)
    assert result_of(content) == LAYER

    node.mirror.health.alive(("10.0.0.2", 5000))

    assert node.mirror.health.quarantined(("10.0.0.2", 5000))


@implementer(ILookup)
class BusyLookup:
    """A DHT search whose nodes answer late: the provider comes after ``delay``."""

    def __init__(self, clock: Clock, provider: tuple[str, int] | None, delay: float) -> None:
        self.clock = clock
        self.provider = provider
        self.delay = delay
        self.given = False

    def next_provider(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        if self.given or self.provider is None:
            return d
        self.given = True
        self.clock.callLater(self.delay, d.callback, self.provider)
        return d

    def cancel(self) -> None:
        pass

    def answering(self) -> bool:
        return True


def test_a_lookup_whose_nodes_answer_late_is_waited_for(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", peer_registry(LAYER))
    node = Node(peers, {})
    lookup = BusyLookup(node.clock, ("10.0.0.2", 5000), 0.3)
    node.mirror._router.lookup = lambda key, count: lookup  # type: ignore[method-assign]

    response_d = node.get(BLOB_PATH)
    for _ in range(2):
        node.advance(0.1)
    assert not fired(response_d), "past mirror-resolve-timeout, but nodes have yet to answer"
    node.advance(0.1)

    response, body = node.body(response_d)
    assert (response.code, body) == (200, LAYER)


def test_a_lookup_still_waiting_after_a_second_is_a_404(peers: Peers) -> None:
    node = Node(peers, {})
    lookup = BusyLookup(node.clock, None, 0.0)
    node.mirror._router.lookup = lambda key, count: lookup  # type: ignore[method-assign]

    response_d = node.get(BLOB_PATH)
    for _ in range(9):
        node.advance(0.1)
    assert not fired(response_d)
    for _ in range(3):
        node.advance(0.1)

    assert result_of(response_d).code == 404


def test_a_blob_longer_than_its_verified_manifest_says_is_refused(peers: Peers) -> None:
    """The manifest, fetched by digest through the node, names the layer's size; a peer
    that then declares another length is a liar, and the next provider serves."""
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "x", "digest": LAYER_DIGEST, "size": len(LAYER)},
            "layers": [],
        }
    ).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    longer = Lying({b"content-length": b"%d" % (len(LAYER) + 10)}, data=LAYER + b"x" * 10)
    peers.add("10.0.0.2:5000", longer)
    peers.add("10.0.0.3:5000", peer_registry(LAYER, manifest))
    node = Node(
        peers,
        {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"], manifest_digest: ["10.0.0.3:5000"]},
    )

    manifest_path = f"/v2/library/demo/manifests/{manifest_digest}?ns={NS}"
    assert node.download(manifest_path) == manifest
    assert node.download(BLOB_PATH) == LAYER

    assert node.mirror.health.quarantined(("10.0.0.2", 5000))
    assert node.mirror.sizes.get(LAYER_DIGEST) == len(LAYER)


def test_sizes_are_not_learned_from_a_tag_a_peer_answers(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", peer_registry(MANIFEST, images={NAME: MANIFEST_DIGEST}))
    node = Node(peers, {NAME: ["10.0.0.2:5000"]})

    node.download(f"/v2/library/demo/manifests/v1?ns={NS}")

    assert node.mirror.sizes.get(LAYER_DIGEST) is None


def test_a_forwarded_answer_names_the_registry_in_oci_namespace(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]})

    for method in ("HEAD", "GET"):
        response, _ = node.body(node.get(BLOB_PATH, method))
        assert response.code == 200
        assert response.headers.getRawHeaders("oci-namespace") == [NS]


@pytest.mark.parametrize(
    "path",
    [BLOB_PATH, f"/v2/library/demo/manifests/{MANIFEST_DIGEST}?ns={NS}"],
)
def test_a_filtered_request_is_neither_served_nor_forwarded(peers: Peers, path: str) -> None:
    peers.add("10.0.0.2:5000", peer_registry(LAYER, MANIFEST))
    providers = {LAYER_DIGEST: ["10.0.0.2:5000"], MANIFEST_DIGEST: ["10.0.0.2:5000"]}
    node = Node(peers, providers, registry={"registry_filters": [re.compile(r"^registry\.test/")]})

    response, body = node.body(node.get(path))

    assert response.code == 404
    assert "registry-filters" in json.loads(body)["errors"][0]["message"]
    assert peers.sent == [], "nothing may be asked of a peer for a filtered name"
    assert Node(peers, providers).download(path) in (LAYER, MANIFEST), "unfiltered, it is served"


def test_a_tag_without_ns_is_answered_alike_held_here_or_by_a_peer(peers: Peers) -> None:
    """A node holding the image and a node that would forward give the same 404."""
    peers.add("10.0.0.2:5000", peer_registry(MANIFEST, images={NAME: MANIFEST_DIGEST}))
    forwarding = Node(peers, {NAME: ["10.0.0.2:5000"]})
    holding = Node(Peers(), {}, store=MemoryStore([MANIFEST], {NAME: MANIFEST_DIGEST}))
    path = "/v2/library/demo/manifests/v1"

    answers = [
        node.body(node.get(path, method))
        for method in ("GET", "HEAD")
        for node in (forwarding, holding)
    ]

    assert [response.code for response, _ in answers] == [404] * 4
    assert json.loads(answers[0][1]) == json.loads(answers[1][1])
    assert peers.sent == []
    with_ns = [node.download(f"{path}?ns={NS}") for node in (forwarding, holding)]
    assert with_ns == [MANIFEST, MANIFEST], "with ns both serve it, the one from its peer"


def test_a_node_with_credentials_forwards_them_to_its_peers(peers: Peers) -> None:
    auth = BasicAuth(b"spegel", b"secret")
    peers.add(
        "10.0.0.2:5000", Registry(MemoryReactor(), MemoryStore([LAYER]), auth=auth).resource()
    )
    node = Node(AuthorizedClient(peers, auth), {LAYER_DIGEST: ["10.0.0.2:5000"]}, {"auth": auth})
    node.peers = peers

    unauthorized = result_of(node.get(BLOB_PATH))
    assert unauthorized.code == 401
    assert peers.sent == []
    response, body = node.body(node.get(BLOB_PATH, Authorization=auth.header().decode()))

    assert (response.code, body) == (200, LAYER)
    [(_, _, headers)] = peers.sent
    assert headers[b"authorization"] == [auth.header()]


def test_a_peer_that_refuses_the_credentials_is_passed_over_to_a_404(peers: Peers) -> None:
    peers.add(
        "10.0.0.2:5000",
        Registry(MemoryReactor(), MemoryStore([LAYER]), auth=BasicAuth(b"a", b"b")).resource(),
    )
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]})

    response, body = node.body(node.get(BLOB_PATH))

    assert response.code == 404
    assert error_codes(body) == ["BLOB_UNKNOWN"], "containerd goes to the registry"


# The first wave: peers still downloading a blob


def test_a_complete_copy_is_asked_before_a_peer_still_downloading_it(peers: Peers) -> None:
    peers.add("10.0.0.2:5000", peer_registry(LAYER))
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    node = Node(
        peers,
        {in_flight_key(LAYER_DIGEST): ["10.0.0.3:5000"], LAYER_DIGEST: ["10.0.0.2:5000"]},
    )

    response, body = node.body(node.get(BLOB_PATH))

    assert (response.code, body) == (200, LAYER)
    assert peers.asked() == ["10.0.0.2:5000"]


def test_a_peer_still_downloading_is_asked_when_nobody_holds_the_blob(peers: Peers) -> None:
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    node = Node(peers, {in_flight_key(LAYER_DIGEST): ["10.0.0.3:5000"]})

    response, body = node.body(node.get(BLOB_PATH))

    assert (response.code, body) == (200, LAYER)
    assert peers.asked() == ["10.0.0.3:5000"]


def test_without_in_flight_sharing_downloads_are_not_looked_up(peers: Peers) -> None:
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    node = Node(peers, {in_flight_key(LAYER_DIGEST): ["10.0.0.3:5000"]}, follow_downloads=False)

    response, _ = node.body(node.get(BLOB_PATH))

    assert response.code == 404
    assert peers.asked() == []


def test_manifests_are_not_looked_up_among_downloads(peers: Peers) -> None:
    peers.add("10.0.0.3:5000", peer_registry(MANIFEST))
    node = Node(peers, {in_flight_key(MANIFEST_DIGEST): ["10.0.0.3:5000"]})

    response, _ = node.body(node.get(f"/v2/library/demo/manifests/{MANIFEST_DIGEST}?ns={NS}"))

    assert response.code == 404


def test_a_body_whose_providers_all_say_404_ends_at_once_for_the_client_to_go_on(
    peers: Peers,
) -> None:
    """A download that stopped: its peer answers the resume with 404 (it no longer offers
    it). Waiting cannot help, so the client is let go after that one round of asking,
    not after resume_timeout."""
    source = Scripted(cut=1000)
    peers.add("10.0.0.2:5000", source)
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]}, resume_timeout=10.0)
    response = result_of(node.get(BLOB_PATH))
    broken = peers.stubs["10.0.0.2:5000"]
    peers.add("10.0.0.2:5000", peer_registry())  # alive, without the blob
    content = treq.content(response)
    broken.flush()
    node.advance(0.1)  # the first pause before providers are asked again

    assert isinstance(result_of(content), Failure)
    assert node.mirror.counters["peer_not_found"] == 1


def test_a_peer_that_sent_a_bad_copy_is_not_asked_for_that_digest_again(peers: Peers) -> None:
    liar = Scripted(data=b"x" * len(LAYER))
    peers.add("10.0.0.2:5000", liar)
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000"]})
    assert isinstance(node.download(BLOB_PATH), Failure)

    answer = node.get(BLOB_PATH)
    node.advance(0.1)  # the lookup's idle wait: nobody else holds it
    response, _ = node.body(answer)

    assert response.code == 404, "its only provider has a bad copy: the registry decides"
    assert len(liar.requests) == 1
    assert node.mirror.counters["bad_copy_skipped"] == 1
    node.clock.advance(600)
    assert node.download(BLOB_PATH) != LAYER and len(liar.requests) == 2, "after 10 minutes"


def test_a_bad_copy_is_passed_over_for_the_next_provider(peers: Peers) -> None:
    liar = Scripted(data=b"x" * len(LAYER))
    peers.add("10.0.0.2:5000", liar)
    peers.add("10.0.0.3:5000", peer_registry(LAYER))
    node = Node(peers, {LAYER_DIGEST: ["10.0.0.2:5000", "10.0.0.3:5000"]})
    assert isinstance(node.download(BLOB_PATH), Failure), "the liar is asked first"

    assert node.download(BLOB_PATH) == LAYER
    assert len(liar.requests) == 1
