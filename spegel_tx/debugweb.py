"""The debug web page: what this node knows and serves, and a pull measured through its peers.

Mounted at ``/debug/web/`` on the metrics address only when ``debug-web-enabled`` is true.
The page is three package files (``spegel_tx/web/``) and nothing from outside the
cluster, since nodes often have no way out; its script fills it from two JSON endpoints.
The measure asks peers directly, as this node's mirror would, but one item at a time
so that each item's speed is its own.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, cast

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IRequest

from spegel_tx.config import Address
from spegel_tx.content import Descriptor
from spegel_tx.debug import LOOKUP_BUDGET, json_page, readiness_fields, routing_table
from spegel_tx.interfaces import ILookup, IRouter
from spegel_tx.logs import error_text
from spegel_tx.nodemetrics import MirroredRequest, NodeMetrics
from spegel_tx.oci.manifest import (
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MAX_MANIFEST_SIZE,
    children,
    detect_media_type,
    platform_manifest,
)
from spegel_tx.oci.reference import split_image_name
from spegel_tx.readiness import Readiness
from spegel_tx.registry.mirror import MIRRORED_HEADER, MirrorSettings, peer_url, request_peer
from spegel_tx.registry.peers import Peer
from spegel_tx.routing.kademlia.protocol import KademliaProtocol
from spegel_tx.state import StateTracker

WEB_FILES = {
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "style.css": b"text/css; charset=utf-8",
}

PLATFORM = ("linux", "amd64")
"""Whose manifest is measured under an index: what containerd on an amd64 Linux node pulls."""

_ACCEPT = ", ".join(sorted(MANIFEST_MEDIA_TYPES)).encode()


class PeerFailed(Exception):
    """A peer did not serve an item: what it answered, or how it stopped."""


@dataclass
class Item:
    """One measured fetch: a manifest, a config or a layer."""

    digest: str
    media_type: str
    size: int
    """Bytes the referring manifest declares (-1 for the first manifest, known only once read)."""
    peer: str | None = None
    lookup_ms: float | None = None
    """From the start of the DHT lookup to the first provider found."""
    fetch_s: float | None = None
    """From the request to the peer to the last byte of the body."""
    bytes: int = 0
    mb_per_s: float | None = None
    error: str | None = None
    tried: list[str] = field(default_factory=list)
    """Providers that failed before one served it, each with why."""


class DebugWeb:
    app = Klein()

    def __init__(
        self,
        clock: Any,
        router: IRouter,
        protocol: KademliaProtocol,
        tracker: StateTracker,
        metrics: NodeMetrics,
        client: Any,
        settings: MirrorSettings,
        readiness: Readiness,
        facts: Mapping[str, str],
    ) -> None:
        """``protocol`` is the router's, for this node's id and routing table; ``client``
        is treq-like, with the node's peer connection pool; ``facts`` what the node is
        (its addresses, containerd, bootstrap), shown as they are."""
        self._clock = clock
        self._router = router
        self._readiness = readiness
        self._protocol = protocol
        self._tracker = tracker
        self._metrics = metrics
        self._client = client
        self._settings = settings
        self._facts = dict(facts)

    def resource(self) -> Any:
        return self.app.resource()

    @app.route("/", methods=["GET"])
    def index(self, request: IRequest) -> bytes:
        return self.static(request, "index.html")

    @app.route("/<name>", methods=["GET"])
    def static(self, request: IRequest, name: str) -> bytes:
        if name not in WEB_FILES:
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"content-type", WEB_FILES[name])
        return (resources.files("spegel_tx") / "web" / name).read_bytes()

    @app.route("/api/node", methods=["GET"])
    def node(self, request: IRequest) -> bytes:
        return json_page(request, self.node_page())

    def node_page(self) -> dict[str, Any]:
        now = self._clock.seconds()
        last_success = self._metrics.last_mirror_success
        return {
            "node_id": self._protocol.node_id.hex(),
            **readiness_fields(self._readiness),
            "facts": self._facts,
            "peers": routing_table(self._protocol),
            "images": [
                {"name": name, "digest": digest}
                for name, digest in sorted(self._tracker.images.items())
            ],
            "advertised_keys": len(self._tracker.advertised),
            "advertised_by_registry": {
                registry: {"tags": tags, "images": images, "contents": contents}
                for registry, (tags, images, contents) in sorted(
                    self._tracker.advertised_by_registry().items()
                )
            },
            "last_mirror_success": (
                {"at": last_success, "ago_s": round(now - last_success, 1)}
                if last_success
                else None
            ),
            "recent_mirrored": mirrored_rows(self._metrics.recent_mirrored, now),
            "first_wave": {
                "mode": self._tracker.first_wave.value,
                "watching": self._tracker.watching_downloads,
                "downloads": [
                    {"digest": digest, "received": ingest.received, "total": ingest.total}
                    for digest, ingest in sorted(self._tracker.in_flight.items())
                ],
                "committed": sorted(self._tracker.landed),
            },
            "recent_in_flight": mirrored_rows(self._metrics.recent_in_flight, now),
        }

    @app.route("/api/measure", methods=["GET", "POST"])
    async def measure(self, request: IRequest) -> bytes:
        images = request.args.get(b"image")
        image = images[0].decode("utf-8", "replace").strip() if images else ""
        status, result = await self.measure_pull(image)
        request.setResponseCode(status)
        return json_page(request, result)

    async def measure_pull(self, image: str) -> tuple[int, dict[str, Any]]:
        """Fetch ``image`` from its providers as a pull here would, without storing it:
        its manifest (this platform's, under an index), then its config and layers."""
        name = split_image_name(image)
        if name is None or (name.tag is None and name.digest is None):
            return 400, {
                "image": image,
                "error": "name the image as containerd does, "
                "such as docker.io/library/nginx:1.27 or registry/repo@sha256:...",
            }
        started = time.perf_counter()
        items: list[Item] = []

        def result(status: int, error: str | None = None) -> tuple[int, dict[str, Any]]:
            return status, measured(image, items, time.perf_counter() - started, error)

        blobs = f"/v2/{name.repository}/blobs/"
        manifests = f"/v2/{name.repository}/manifests/"
        query = "?ns=" + urllib.parse.quote(name.registry, safe="")
        key = name.digest or f"{name.registry}/{name.repository}:{name.tag}"
        reference = name.digest or name.tag
        item, body = await self._fetch(key, manifests + f"{reference}{query}", None, True)
        items.append(item)
        if body is None:
            return result(404, item.error)
        if detect_media_type(body) in INDEX_MEDIA_TYPES:
            chosen = platform_manifest(body, *PLATFORM)
            if chosen is None:
                return result(502, f"the index of {image} lists no manifest")
            item, body = await self._fetch(
                chosen.digest, manifests + f"{chosen.digest}{query}", chosen, True
            )
            items.append(item)
            if body is None:
                return result(502, item.error)
        for child in children(body):
            item, _ = await self._fetch(
                child.digest, blobs + f"{child.digest}{query}", child, False
            )
            items.append(item)
        failed = sum(1 for item in items if item.error)
        return result(200, f"{failed} of {len(items)} items failed" if failed else None)

    async def _fetch(
        self, key: str, path: str, expected: Descriptor | None, keep: bool
    ) -> tuple[Item, bytes | None]:
        """The item from the first provider of ``key`` that serves it whole, and its
        body if ``keep``; None when none did (the item's ``error`` says why)."""
        if expected is None:
            item = Item(key, "", -1)
        else:
            item = Item(expected.digest, expected.media_type, expected.size)
        search = self._router.lookup(key, self._settings.resolve_retries)
        started = time.perf_counter()
        try:
            while (peer := await self._next_provider(search)) is not None:
                if item.lookup_ms is None:
                    item.lookup_ms = round((time.perf_counter() - started) * 1000, 3)
                address = str(Address(*peer))
                try:
                    body = await self._get(item, peer_url(peer, path), keep)
                except CancelledError:
                    raise  # the operator went away: stop measuring
                except Exception as e:
                    # Whatever went wrong with one peer, the next one is tried.
                    item.tried.append(f"{address}: {error_text(e)}")
                    continue
                item.peer = address
                return item, body
        finally:
            search.cancel()
        if item.tried:
            item.error = f"no provider of {key} served it"
        else:
            item.error = f"no peer holds {key} (DHT lookup found no provider)"
        return item, None

    async def _next_provider(self, search: ILookup) -> Peer | None:
        """Waiting for a provider ends the search after LOOKUP_BUDGET seconds."""
        deadline = self._clock.callLater(LOOKUP_BUDGET, search.cancel)
        try:
            return await search.next_provider()
        finally:
            if deadline.active():
                deadline.cancel()

    async def _get(self, item: Item, url: str, keep: bool) -> bytes | None:
        """GET ``url`` from a peer as a forwarded request, filling in ``item``'s
        figures; each step bounded by the mirror's own timeouts."""
        started = time.perf_counter()
        headers = {MIRRORED_HEADER: [b"true"], b"accept": [_ACCEPT]}
        response = await request_peer(
            self._clock, self._client, "GET", url, headers, self._settings.response_timeout
        )
        reader = BodyCounter(
            self._clock, self._settings.idle_timeout, keep and response.code == 200
        )
        response.deliverBody(reader)
        received = await reader.done
        seconds = time.perf_counter() - started
        if response.code != 200:
            raise PeerFailed(f"answered {response.code}")
        if item.size >= 0 and received != item.size:
            raise PeerFailed(f"sent {received} bytes, not {item.size}")
        if item.size < 0:
            item.size = received
            digest = response.headers.getRawHeaders(b"docker-content-digest", [b""])[0]
            item.digest = digest.decode("latin-1") or item.digest
        if not item.media_type:
            item.media_type = detect_media_type(reader.body()) or ""
        item.fetch_s = round(seconds, 6)
        item.bytes = received
        item.mb_per_s = speed(received, seconds)
        return reader.body() if keep else None


class BodyCounter(Protocol):
    """Counts a response body and drops it, so that a blob of any size costs no memory;
    keeps it only if asked (a manifest, up to MAX_MANIFEST_SIZE). ``done`` fires with the
    byte count, or fails once the body breaks or stays silent for ``idle`` seconds."""

    def __init__(self, clock: Any, idle: float, keep: bool) -> None:
        self.done: Deferred[int] = Deferred(lambda _: self._stop())
        self.received = 0
        self._idle = idle
        self._kept: list[bytes] | None = [] if keep else None
        self._timer = clock.callLater(idle, self._fail, PeerFailed(f"silent for {idle:g} s"))

    def body(self) -> bytes:
        return b"".join(self._kept or ())

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.received += len(data)
        if self._kept is not None:
            if self.received > MAX_MANIFEST_SIZE:
                self._fail(PeerFailed(f"a manifest larger than {MAX_MANIFEST_SIZE} bytes"))
                return
            self._kept.append(data)
        self._timer.reset(self._idle)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer.active():
            self._timer.cancel()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.received)
        else:
            self.done.errback(reason)

    def _fail(self, error: Exception) -> None:
        self._stop()
        if not self.done.called:
            self.done.errback(error)

    def _stop(self) -> None:
        if self._timer.active():
            self._timer.cancel()
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()


def speed(received: int, seconds: float) -> float | None:
    """MB/s (10^6 bytes), or None when no time could be measured."""
    return round(received / seconds / 1e6, 3) if seconds > 0 else None


def measured(image: str, items: list[Item], seconds: float, error: str | None) -> dict[str, Any]:
    total = sum(item.bytes for item in items)
    fetching = sum(item.fetch_s or 0.0 for item in items)
    return {
        "image": image,
        "error": error,
        "items": [asdict(item) for item in items],
        "total": {
            "items": len(items),
            "failed": sum(1 for item in items if item.error),
            "bytes": total,
            "fetch_s": round(fetching, 6),
            "mb_per_s": speed(total, fetching),
            "elapsed_s": round(seconds, 6),
        },
    }


def mirrored_rows(recent: Iterable[MirroredRequest], now: float) -> list[dict[str, Any]]:
    """The requests this node forwarded, newest first, with their speed and age."""
    return [
        {
            "at": request.at,
            "ago_s": round(now - request.at, 1),
            "method": request.method,
            "path": request.path,
            "what": _what(request.path),
            "status": request.status,
            "peer": request.peer,
            "bytes": request.bytes,
            "seconds": round(request.seconds, 6),
            "mb_per_s": speed(request.bytes, request.seconds),
            "completed": request.completed,
        }
        for request in reversed(list(recent))
    ]


def _what(path: str) -> str:
    """What a registry path asks for: a digest, or ``repository:tag``."""
    rest, _, reference = path.rpartition("/")
    if ":" in reference:
        return reference
    return f"{rest.removeprefix('/v2/').rsplit('/', 1)[0]}:{reference}"
