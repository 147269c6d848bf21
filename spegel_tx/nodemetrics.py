"""The metrics a node exports, and the recent forwarded requests its debug page lists.

What other parts already count (the DHT's datagrams, the mirror's failovers,
what is advertised) is read from them when Prometheus scrapes, not kept twice.
"""

from __future__ import annotations

from collections import Counter as CountOf
from collections import deque
from dataclasses import dataclass
from typing import Any

from spegel_tx.metrics import (
    SIZE_BUCKETS,
    Collected,
    Counter,
    Gauge,
    Histogram,
    Labels,
    MetricsRegistry,
    by_key,
)

RECENT_MIRRORED = 100
"""Forwarded requests the debug page can list."""

ROUTER_LABEL = "kademlia"

PEER_EVENTS = (
    "hedged",
    "resumed",
    "digest_mismatch",
    "peer_failed",
    "peer_not_found",
    "skipped_quarantined",
)
"""Mirror counters exported as ``spegel_tx_mirror_peer_events_total{event}``."""


@dataclass(frozen=True)
class MirroredRequest:
    """One request this node forwarded to a peer, as the access log saw it end."""

    at: float
    method: str
    path: str
    status: int
    peer: str
    bytes: int
    seconds: float
    completed: bool


class NodeMetrics:
    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self.registry = MetricsRegistry()
        add = self.registry.register
        self.mirror_requests = add(
            Counter(
                "spegel_mirror_requests_total",
                "Requests not held here and forwarded to peers: cache=hit when a peer "
                "served them, miss when none could.",
                ("registry", "cache"),
            )
        )
        self.mirror_last_success = add(
            Gauge(
                "spegel_mirror_last_success_timestamp_seconds",
                "Unix time of the last request a peer served.",
            )
        )
        self.resolve_duration = add(
            Histogram(
                "spegel_resolve_duration_seconds",
                "Seconds from the start of a DHT lookup to each provider it found.",
                ("router",),
            )
        )
        self.http_duration = add(
            Histogram(
                "http_request_duration_seconds",
                "Seconds from a registry request's arrival to its end.",
                ("handler", "method", "code"),
            )
        )
        self.http_size = add(
            Histogram(
                "http_response_size_bytes",
                "Bytes sent in a registry response's body.",
                ("handler", "method", "code"),
                SIZE_BUCKETS,
            )
        )
        self.http_inflight = add(
            Gauge(
                "http_requests_inflight",
                "Registry requests being answered now.",
                ("handler",),
            )
        )
        self.served_bytes = add(
            Counter(
                "spegel_tx_served_bytes_total",
                "Body bytes served to clients: source=local from this node's containerd, "
                "peer relayed from another node.",
                ("source",),
            )
        )
        self.upstream_fallbacks = add(
            Counter(
                "spegel_tx_upstream_fallbacks_total",
                "Content requests answered 404, which sends containerd to the real registry.",
                ("registry",),
            )
        )
        self.recent_mirrored: deque[MirroredRequest] = deque(maxlen=RECENT_MIRRORED)

    # The registry's requests

    def request_started(self, path: bytes) -> None:
        self.http_inflight.inc(_handler(path))

    def request_finished(
        self,
        path: bytes,
        method: str,
        code: int,
        sent: int,
        seconds: float,
        served_by: str,
        registry: str,
        peer: str,
        completed: bool,
    ) -> None:
        """``served_by`` is the access log's ``handler``: ``local``, ``mirror`` or ``-``."""
        handler = _handler(path)
        self.http_inflight.inc(handler, amount=-1)
        self.http_duration.observe(seconds, handler, method, str(code))
        self.http_size.observe(sent, handler, method, str(code))
        if served_by == "local":
            self.served_bytes.inc("local", amount=sent)
        elif served_by == "mirror":
            self.served_bytes.inc("peer", amount=sent)
            self.recent_mirrored.append(
                MirroredRequest(
                    at=self._clock.seconds(),
                    method=method,
                    path=path.decode("utf-8", "replace"),
                    status=code,
                    peer=peer,
                    bytes=sent,
                    seconds=seconds,
                    completed=completed,
                )
            )
        if code == 404 and handler == "/v2/*":
            self.upstream_fallbacks.inc(registry)

    def forwarded(self, registry: str, served: bool) -> None:
        """A request went to the mirror; ``served`` whether a peer answered it."""
        self.mirror_requests.inc(registry, "hit" if served else "miss")
        if served:
            self.mirror_last_success.set(self._clock.seconds())

    def resolved(self, seconds: float) -> None:
        self.resolve_duration.observe(seconds, ROUTER_LABEL)

    # Read from the parts that keep them

    def watch_dht(self, protocol: Any) -> None:
        """``protocol`` is the node's KademliaProtocol."""
        counters: CountOf[str] = protocol.counters
        directions = ("in", "out")
        add = self.registry.register
        add(
            Collected(
                "counter",
                "spegel_tx_dht_datagrams_total",
                "DHT datagrams received (in) and sent (out).",
                ("direction",),
                lambda: {(d,): counters[f"datagrams_{d}"] for d in directions},
            )
        )
        add(
            Collected(
                "counter",
                "spegel_tx_dht_bytes_total",
                "DHT bytes received (in) and sent (out).",
                ("direction",),
                lambda: {(d,): counters[f"bytes_{d}"] for d in directions},
            )
        )
        add(
            Collected(
                "counter",
                "spegel_tx_dht_dropped_datagrams_total",
                "DHT datagrams dropped, by reason (auth, replay, stale, short, truncated, ...).",
                ("reason",),
                lambda: {
                    (name.removeprefix("dropped_"),): value
                    for name, value in counters.items()
                    if name.startswith("dropped_")
                },
            )
        )
        add(
            Collected(
                "counter",
                "spegel_tx_dht_request_timeouts_total",
                "DHT requests a peer did not answer in time.",
                (),
                lambda: {(): counters["timeouts"]},
            )
        )
        add(
            Collected(
                "gauge",
                "spegel_tx_dht_routing_table_peers",
                "Peers in this node's DHT routing table.",
                (),
                lambda: {(): len(protocol.table)},
            )
        )
        add(
            Collected(
                "gauge",
                "spegel_tx_dht_records_stored",
                "Provider records this node holds for others.",
                (),
                lambda: {(): len(protocol.records)},
            )
        )

    def watch_mirror(self, mirror: Any) -> None:
        """``mirror`` is the node's Mirror."""
        add = self.registry.register
        add(
            Collected(
                "counter",
                "spegel_tx_mirror_peer_events_total",
                "Forwarding events: second providers hedged, bodies resumed, digest "
                "mismatches, peers failed or without the content, quarantined peers skipped.",
                ("event",),
                lambda: by_key(mirror.counters, PEER_EVENTS),
            )
        )
        add(
            Collected(
                "gauge",
                "spegel_tx_peers_quarantined",
                "Peers skipped for now after refusing, timing out or sending bad content.",
                (),
                lambda: {(): len(mirror.health.quarantined_peers())},
            )
        )

    def watch_state(self, tracker: Any) -> None:
        """``tracker`` is the node's StateTracker."""
        add = self.registry.register

        def counts(index: int) -> dict[Labels, float]:
            return {
                (registry,): float(numbers[index])
                for registry, numbers in tracker.advertised_by_registry().items()
            }

        add(
            Collected(
                "gauge",
                "spegel_advertised_image_tags",
                "Image tags advertised to be available.",
                ("registry",),
                lambda: counts(0),
            )
        )
        add(
            Collected(
                "gauge",
                "spegel_advertised_image_digests",
                "Image digests (what a tag names) advertised to be available.",
                ("registry",),
                lambda: counts(1),
            )
        )
        add(
            Collected(
                "gauge",
                "spegel_advertised_content_digests",
                "Content digests (indexes, manifests, configs, layers) advertised.",
                ("registry",),
                lambda: counts(2),
            )
        )


def _handler(path: bytes) -> str:
    """Spegel's handler label: its route pattern, so label values stay few."""
    if path.startswith(b"/v2/"):
        return "/v2/*"
    if path in (b"/readyz", b"/livez"):
        return path.decode()
    return "other"
