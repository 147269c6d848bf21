"""The debug web page's JSON and files, on memory parts: no sockets.

Peers are real registries over memory stores, reached through one StubTreq that
sends each request to the peer its Host names; a host with no peer answers 404,
as a peer whose record is stale does.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import treq
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.vhost import NameVirtualHost
from zope.interface import implementer

from spegel_tx.debug import LOOKUP_BUDGET, DebugPages
from spegel_tx.debugweb import DebugWeb, mirrored_rows, speed
from spegel_tx.interfaces import ILookup, IRouter
from spegel_tx.nodemetrics import MirroredRequest, NodeMetrics
from spegel_tx.oci.manifest import MAX_MANIFEST_SIZE, platform_manifest
from spegel_tx.readiness import NO_PEER, Readiness
from spegel_tx.registry.app import Registry
from spegel_tx.registry.mirror import MirrorSettings
from spegel_tx.routing.kademlia.messages import Contact
from spegel_tx.routing.kademlia.protocol import KademliaProtocol
from spegel_tx.routing.kademlia.router import KademliaRouter
from spegel_tx.routing.memory import MemoryRouter, MemoryRoutingTable
from spegel_tx.service import metrics_root
from spegel_tx.state import StateTracker
from spegel_tx.testing import FixedBootstrapper, MemoryStore

NS = "registry.test"
NAME = f"{NS}/library/demo:v1"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
FACTS = {"registry": "10.0.0.1:5000", "router": "10.0.0.1:5001 (UDP)", "metrics": "10.0.0.1:9090"}


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data), **extra}


def amd64(os: str = "linux", architecture: str = "amd64") -> dict[str, Any]:
    return {"platform": {"os": os, "architecture": architecture}}


CONFIG = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
LAYERS = [bytes(range(256)) * 1200, b"second layer" * 5000]
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, CONFIG),
        "layers": [descriptor(OCI_LAYER, layer) for layer in LAYERS],
    }
).encode()
ARM_MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
INDEX = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            descriptor(OCI_MANIFEST, ARM_MANIFEST, **amd64(architecture="arm64")),
            descriptor(OCI_MANIFEST, MANIFEST, **amd64()),
        ],
    }
).encode()
BLOBS = [INDEX, MANIFEST, ARM_MANIFEST, CONFIG, *LAYERS]


class Stalled(Resource):
    """A peer that sends half of every body, then nothing more."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        request.setHeader(b"content-length", b"%d" % len(LAYERS[0]))
        request.write(LAYERS[0][: len(LAYERS[0]) // 2])
        return NOT_DONE_YET


class Oversized(Resource):
    """A peer that answers a manifest request with more than any manifest may hold."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"{" + b" " * MAX_MANIFEST_SIZE + b"}"


class Node:
    """The node whose page is under test, and peers holding what ``holders`` say."""

    def __init__(
        self,
        holders: dict[str, list[str]] | None = None,
        router: IRouter | None = None,
        **peers: Resource,
    ) -> None:
        self.clock = Clock()
        self.table = MemoryRoutingTable()
        hosts = NameVirtualHost()
        for host, resource in peers.items():
            hosts.addHost(host.encode(), resource)
        for key, addresses in (holders or {}).items():
            for address in addresses:
                self.table.router(address, 5000).advertise([key])
        self.peers = StubTreq(hosts)
        self.router = router or self.table.router("10.0.0.1", 5000)
        self.protocol = KademliaProtocol(self.clock, b"\x01" * 32, registry_port=5000)
        self.store = MemoryStore(BLOBS, {NAME: digest_of(INDEX)})
        self.tracker = StateTracker(self.clock, self.store, self.router)
        self.metrics = NodeMetrics(self.clock)
        self.readiness = Readiness(self.store, self.router)
        self.web = DebugWeb(
            self.clock,
            self.router,
            self.protocol,
            self.tracker,
            self.metrics,
            self.peers,
            MirrorSettings(),
            self.readiness,
            FACTS,
        )
        kademlia = KademliaRouter(self.clock, self.protocol, FixedBootstrapper([]), 5001)
        pages = DebugPages(self.clock, kademlia, self.readiness, self.web.resource())
        self.client = StubTreq(metrics_root(self.metrics, pages))

    def run(self, d: Deferred[Any]) -> Any:
        """What ``d`` fires with once the peers' answers have been delivered."""
        results: list[Any] = []
        d.addBoth(results.append)
        for _ in range(100):
            if results:
                break
            self.peers.flush()
            self.client.flush()
        assert results, "never answered"
        return results[0]

    def measure(self, image: str) -> tuple[int, dict[str, Any]]:
        return self.run(Deferred.fromCoroutine(self.web.measure_pull(image)))

    def get(self, path: str, method: str = "GET", **kwargs: Any) -> tuple[Any, bytes]:
        response = self.run(self.client.request(method, f"http://node{path}", **kwargs))
        return response, self.run(treq.content(response))


@implementer(ILookup)
class EndlessLookup:
    """A DHT search that never finds anything and never ends by itself."""

    def __init__(self) -> None:
        self.waiting: Deferred[tuple[str, int] | None] = Deferred()

    def next_provider(self) -> Deferred[tuple[str, int] | None]:
        return self.waiting

    def cancel(self) -> None:
        if not self.waiting.called:
            self.waiting.callback(None)

    def answering(self) -> bool:
        return False


class EndlessRouter(MemoryRouter):
    def __init__(self) -> None:
        super().__init__(MemoryRoutingTable(), ("10.0.0.1", 5000))

    def lookup(self, key: str, count: int) -> ILookup:
        return EndlessLookup()


def holder() -> Resource:
    """A peer's registry holding the whole image."""
    return Registry(MemoryReactor(), MemoryStore(BLOBS, {NAME: digest_of(INDEX)})).resource()


def everything_on(*hosts: str) -> dict[str, list[str]]:
    return {key: list(hosts) for key in [NAME, *map(digest_of, BLOBS)]}


# --- pure parts ---------------------------------------------------------------------------------


def test_speed_is_decimal_megabytes_per_second() -> None:
    assert speed(3_000_000, 1.5) == 2.0
    assert speed(10, 0.0) is None


def test_the_linux_amd64_manifest_of_an_index_is_chosen_else_the_first() -> None:
    assert platform_manifest(INDEX, "linux", "amd64").digest == digest_of(MANIFEST)
    assert platform_manifest(INDEX, "linux", "s390x").digest == digest_of(ARM_MANIFEST)
    assert platform_manifest(b"not an index", "linux", "amd64") is None


def test_recent_mirrored_requests_newest_first_with_speed_and_age() -> None:
    path = f"/v2/library/demo/blobs/{digest_of(LAYERS[0])}"
    recent = [
        MirroredRequest(100.0, "GET", "/v2/library/demo/manifests/v1", 200, "p:1", 500, 0.5, True),
        MirroredRequest(110.0, "GET", path, 200, "10.0.0.2:5000", 4_000_000, 2.0, False),
    ]
    newest, oldest = mirrored_rows(recent, now=115.0)
    assert newest["what"] == digest_of(LAYERS[0])
    assert (newest["peer"], newest["mb_per_s"], newest["ago_s"]) == ("10.0.0.2:5000", 2.0, 5.0)
    assert newest["completed"] is False
    assert oldest["what"] == "library/demo:v1"


# --- the node's state ---------------------------------------------------------------------------


def test_the_node_page_shows_identity_peers_images_and_what_peers_served() -> None:
    node = Node()
    node.protocol.table.seen(Contact(b"\x02" * 32, "10.0.0.2", 5001), now=0.0)
    node.tracker.startService()
    node.clock.advance(10)
    layer = f"/v2/library/demo/blobs/{digest_of(LAYERS[0])}".encode()
    node.metrics.request_finished(
        layer, "GET", 200, len(LAYERS[0]), 0.1, "mirror", NS, "10.0.0.2:5000", True
    )
    node.metrics.forwarded(NS, served=True)
    node.clock.advance(3)

    response, body = node.get("/debug/web/api/node")

    assert response.code == 200
    page = json.loads(body)
    assert page["node_id"] == "01" * 32
    assert page["ready"] is False
    assert page["not_ready_because"] == [NO_PEER], "the memory table has no other member"
    assert page["facts"] == FACTS
    assert page["peers"] == [{"node_id": "02" * 32, "host": "10.0.0.2", "port": 5001}]
    assert page["images"] == [{"name": NAME, "digest": digest_of(INDEX)}]
    assert page["advertised_keys"] == 1 + len(BLOBS), "the tag and every digest under it"
    contents = len(BLOBS)
    assert page["advertised_by_registry"] == {NS: {"tags": 1, "images": 1, "contents": contents}}
    assert page["last_mirror_success"] == {"at": 10.0, "ago_s": 3.0}
    [row] = page["recent_mirrored"]
    assert (row["what"], row["peer"], row["bytes"]) == (
        digest_of(LAYERS[0]),
        "10.0.0.2:5000",
        len(LAYERS[0]),
    )


def test_the_node_page_shows_blobs_sent_to_peers_while_downloading() -> None:
    node = Node()
    node.tracker.startService()
    layer = f"/v2/library/demo/blobs/{digest_of(LAYERS[0])}".encode()
    node.metrics.request_finished(layer, "GET", 200, 1000, 0.5, "in-flight", NS, "10.0.0.3", False)

    page = json.loads(node.get("/debug/web/api/node")[1])

    assert page["first_wave"] == {
        "mode": "off",
        "watching": False,
        "downloads": [],
        "committed": [],
    }
    [row] = page["recent_in_flight"]
    assert (row["what"], row["peer"], row["bytes"], row["completed"]) == (
        digest_of(LAYERS[0]),
        "10.0.0.3",
        1000,
        False,
    )
    assert page["recent_mirrored"] == [], "sent by this node, not relayed from a peer"


def test_the_page_and_its_files_are_served_from_the_package() -> None:
    node = Node()
    response, page = node.get("/debug/web/")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert b'src="app.js"' in page and b'href="style.css"' in page
    for name, kind in [("app.js", b"text/javascript"), ("style.css", b"text/css")]:
        response, content = node.get(f"/debug/web/{name}")
        assert response.code == 200 and content
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(kind)
    assert node.get("/debug/web/secrets.txt")[0].code == 404


def test_without_debug_web_enabled_the_page_is_not_there() -> None:
    clock = Clock()
    protocol = KademliaProtocol(clock, b"\x01" * 32, registry_port=5000)
    router = KademliaRouter(clock, protocol, FixedBootstrapper([]), 5001)
    readiness = Readiness(MemoryStore(), router)
    client = StubTreq(metrics_root(NodeMetrics(clock), DebugPages(clock, router, readiness)))
    for path in ("/debug/web/", "/debug/web/api/node", "/debug/web/app.js"):
        response = client.get(f"http://node{path}")
        client.flush()
        assert response.result.code == 404, path
    peers = client.get("http://node/debug/peers")
    client.flush()
    assert peers.result.code == 200


# --- measuring a pull ---------------------------------------------------------------------------


def test_a_measure_fetches_the_amd64_manifest_config_and_layers_from_providers() -> None:
    node = Node(everything_on("10.0.0.2"), **{"10.0.0.2": holder()})

    status, result = node.measure(NAME)

    assert status == 200 and result["error"] is None
    rows = {row["digest"]: row for row in result["items"]}
    wanted = [INDEX, MANIFEST, CONFIG, *LAYERS]
    assert list(rows) == [digest_of(data) for data in wanted]
    for data in wanted:
        row = rows[digest_of(data)]
        assert row["peer"] == "10.0.0.2:5000"
        assert row["bytes"] == row["size"] == len(data)
        assert row["lookup_ms"] >= 0 and row["fetch_s"] > 0 and row["mb_per_s"] > 0
        assert row["error"] is None and row["tried"] == []
    assert rows[digest_of(INDEX)]["media_type"] == OCI_INDEX
    assert rows[digest_of(CONFIG)]["media_type"] == OCI_CONFIG
    assert result["total"]["bytes"] == sum(map(len, wanted))
    assert result["total"]["failed"] == 0 and result["total"]["mb_per_s"] > 0


def test_measure_requests_are_marked_as_forwarded() -> None:
    seen: list[Any] = []

    class Recording(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            seen.append(request.getHeader(b"x-spegel-mirrored"))
            request.setResponseCode(404)
            return b""

    node = Node({NAME: ["10.0.0.2"]}, **{"10.0.0.2": Recording()})
    status, result = node.measure(NAME)
    assert seen == [b"true"]
    assert status == 404
    assert result["items"][0]["tried"] == ["10.0.0.2:5000: answered 404"]


def test_an_image_nobody_holds_says_so() -> None:
    node = Node()
    status, result = node.measure(NAME)
    assert status == 404
    assert result["error"] == f"no peer holds {NAME} (DHT lookup found no provider)"
    assert result["total"]["bytes"] == 0


def test_a_lookup_that_finds_nothing_ends_after_its_budget() -> None:
    node = Node(router=EndlessRouter())
    measuring = Deferred.fromCoroutine(node.web.measure_pull(NAME))
    node.clock.advance(LOOKUP_BUDGET - 0.1)
    assert not measuring.called
    node.clock.advance(0.1)
    status, result = node.run(measuring)
    assert status == 404 and result["error"].startswith(f"no peer holds {NAME}")


def test_a_stale_record_is_passed_over_for_the_next_provider() -> None:
    node = Node(everything_on("10.0.0.9", "10.0.0.2"), **{"10.0.0.2": holder()})
    status, result = node.measure(NAME)
    assert status == 200
    for row in result["items"]:
        assert row["peer"] == "10.0.0.2:5000"
        assert row["tried"] == ["10.0.0.9:5000: answered 404"]


def test_a_peer_silent_mid_body_is_left_after_the_idle_timeout() -> None:
    node = Node(
        everything_on("10.0.0.2") | {digest_of(LAYERS[0]): ["10.0.0.7", "10.0.0.2"]},
        **{"10.0.0.2": holder(), "10.0.0.7": Stalled()},
    )
    measuring = Deferred.fromCoroutine(node.web.measure_pull(NAME))
    for _ in range(20):
        node.peers.flush()
    assert not measuring.called
    node.clock.advance(MirrorSettings().idle_timeout)
    status, result = node.run(measuring)
    assert status == 200
    [row] = [row for row in result["items"] if row["digest"] == digest_of(LAYERS[0])]
    assert row["tried"] == ["10.0.0.7:5000: silent for 5 s"]
    assert row["peer"] == "10.0.0.2:5000" and row["bytes"] == len(LAYERS[0])


def test_a_missing_layer_is_reported_and_the_rest_measured() -> None:
    holders = everything_on("10.0.0.2")
    del holders[digest_of(LAYERS[1])]
    node = Node(holders, **{"10.0.0.2": holder()})
    status, result = node.measure(NAME)
    assert status == 200
    assert result["error"] == "1 of 5 items failed"
    failed = [row for row in result["items"] if row["error"]]
    assert [row["digest"] for row in failed] == [digest_of(LAYERS[1])]
    assert result["total"]["bytes"] == sum(map(len, [INDEX, MANIFEST, CONFIG, LAYERS[0]]))


@pytest.mark.parametrize("image", ["", "nginx:1.27", "registry.test/library/demo"])
def test_a_name_that_is_not_a_reference_is_refused(image: str) -> None:
    status, result = Node().measure(image)
    assert status == 400
    assert "docker.io/library/nginx:1.27" in result["error"]


def test_the_form_posts_to_the_measure_api() -> None:
    node = Node(everything_on("10.0.0.2"), **{"10.0.0.2": holder()})
    response, body = node.get(
        "/debug/web/api/measure",
        "POST",
        data={"image": NAME},
    )
    assert response.code == 200
    result = json.loads(body)
    assert len(result["items"]) == 5 and result["total"]["failed"] == 0


def test_a_manifest_over_the_limit_is_not_read_into_memory() -> None:
    node = Node({NAME: ["10.0.0.2"]}, **{"10.0.0.2": Oversized()})
    status, result = node.measure(NAME)
    assert status == 404
    assert result["items"][0]["tried"] == [
        f"10.0.0.2:5000: a manifest larger than {MAX_MANIFEST_SIZE} bytes"
    ]
