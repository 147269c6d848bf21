"""The metrics a node exports, and the recent forwarded requests its debug page lists.

What other parts already count (the DHT's datagrams, the mirror's failovers,
what is advertised) is read from them when Prometheus scrapes, not kept twice.
"""

from __future__ import annotations

from collections import Counter as CountOf
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

from spegel_tx.metrics import (
    DURATION_BUCKETS,
    SIZE_BUCKETS,
    Labels,
    ReadAtScrape,
    RegistryLabels,
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
    "quarantined_tried",
    "tag_disagreement",
    "followed_download",
    "download_gave_up",
    "bad_copy_skipped",
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
    """One node's metrics, in a registry of its own (not the library's global one), with
    the process's memory, open files and CPU time as the library reads them."""

    def __init__(self, clock: Any, mirrored_registries: Iterable[str] = ()) -> None:
        self._clock = clock
        self.registry = CollectorRegistry()
        self.registry_label = RegistryLabels(mirrored_registries)
        self.last_mirror_success = 0.0
        """Unix time of the last request a peer served; 0 before the first."""
        self.recent_mirrored: deque[MirroredRequest] = deque(maxlen=RECENT_MIRRORED)
        self.recent_in_flight: deque[MirroredRequest] = deque(maxlen=RECENT_MIRRORED)
        """Blobs this node sent to peers while still downloading them; ``peer`` asked."""
        into = self.registry
        ProcessCollector(registry=into)
        PlatformCollector(registry=into)
        GCCollector(registry=into)
        self.mirror_requests = Counter(
            "spegel_mirror_requests_total",
            "Requests not held here and forwarded to peers: cache=hit when a peer "
            "served them, miss when none could.",
            ("registry", "cache"),
            registry=into,
        )
        Gauge(
            "spegel_mirror_last_success_timestamp_seconds",
            "Unix time of the last request a peer served.",
            registry=into,
        ).set_function(lambda: self.last_mirror_success)
        self.resolve_duration = Histogram(
            "spegel_resolve_duration_seconds",
            "Seconds from the start of a DHT lookup to each provider it found.",
            ("router",),
            registry=into,
            buckets=DURATION_BUCKETS,
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "Seconds from a registry request's arrival to its end.",
            ("handler", "method", "code"),
            registry=into,
            buckets=DURATION_BUCKETS,
        )
        self.http_size = Histogram(
            "http_response_size_bytes",
            "Bytes sent in a registry response's body.",
            ("handler", "method", "code"),
            registry=into,
            buckets=SIZE_BUCKETS,
        )
        self.http_inflight = Gauge(
            "http_requests_inflight",
            "Registry requests being answered now.",
            ("handler",),
            registry=into,
        )
        self.served_bytes = Counter(
            "spegel_tx_served_bytes_total",
            "Body bytes served to clients: source=local from this node's containerd, "
            "in_flight from a download containerd has in progress, peer relayed from "
            "another node.",
            ("source",),
            registry=into,
        )
        self.in_flight_responses = Counter(
            "spegel_tx_in_flight_responses_total",
            "Blobs sent to peers while this node's containerd was still downloading them; "
            "completed=false when the download stopped and the peer resumed elsewhere.",
            ("completed",),
            registry=into,
        )
        for completed in ("true", "false"):
            self.in_flight_responses.labels(completed)
        self.upstream_fallbacks = Counter(
            "spegel_tx_upstream_fallbacks_total",
            "Content requests answered 404, which sends containerd to the real registry.",
            ("registry",),
            registry=into,
        )

    # The registry's requests

    def request_started(self, path: bytes) -> None:
        self.http_inflight.labels(_handler(path)).inc()

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
        """``served_by`` is the access log's ``handler``: ``local``, ``in-flight``,
        ``mirror`` or ``-``."""
        handler = _handler(path)
        self.http_inflight.labels(handler).dec()
        self.http_duration.labels(handler, method, str(code)).observe(seconds)
        self.http_size.labels(handler, method, str(code)).observe(sent)
        if served_by == "local":
            self.served_bytes.labels("local").inc(sent)
        elif served_by in ("in-flight", "mirror"):
            row = MirroredRequest(
                at=self._clock.seconds(),
                method=method,
                path=path.decode("utf-8", "replace"),
                status=code,
                peer=peer,
                bytes=sent,
                seconds=seconds,
                completed=completed,
            )
            if served_by == "mirror":
                self.served_bytes.labels("peer").inc(sent)
                self.recent_mirrored.append(row)
            else:
                self.served_bytes.labels("in_flight").inc(sent)
                self.in_flight_responses.labels("true" if completed else "false").inc()
                self.recent_in_flight.append(row)
        if code == 404 and handler == "/v2/*":
            self.upstream_fallbacks.labels(self.registry_label(registry)).inc()

    def forwarded(self, registry: str, served: bool) -> None:
        """A request went to the mirror; ``served`` whether a peer answered it."""
        label = self.registry_label(registry)
        self.mirror_requests.labels(label, "hit" if served else "miss").inc()
        if served:
            self.last_mirror_success = self._clock.seconds()

    def resolved(self, seconds: float) -> None:
        self.resolve_duration.labels(ROUTER_LABEL).observe(seconds)

    # Read from the parts that keep them

    def _read(
        self,
        family: type[CounterMetricFamily] | type[GaugeMetricFamily],
        name: str,
        documentation: str,
        label_names: tuple[str, ...],
        read: Callable[[], Mapping[Labels, float]],
    ) -> None:
        self.registry.register(ReadAtScrape(family, name, documentation, label_names, read))

    def watch_dht(self, protocol: Any) -> None:
        """``protocol`` is the node's KademliaProtocol."""
        counters: CountOf[str] = protocol.counters
        directions = ("in", "out")
        self._read(
            CounterMetricFamily,
            "spegel_tx_dht_datagrams_total",
            "DHT datagrams received (in) and sent (out).",
            ("direction",),
            lambda: {(d,): counters[f"datagrams_{d}"] for d in directions},
        )
        self._read(
            CounterMetricFamily,
            "spegel_tx_dht_bytes_total",
            "DHT bytes received (in) and sent (out).",
            ("direction",),
            lambda: {(d,): counters[f"bytes_{d}"] for d in directions},
        )
        self._read(
            CounterMetricFamily,
            "spegel_tx_dht_dropped_datagrams_total",
            "DHT datagrams dropped, by reason (auth, replay, stale, short, truncated, ...).",
            ("reason",),
            lambda: {
                (name.removeprefix("dropped_"),): value
                for name, value in counters.items()
                if name.startswith("dropped_")
            },
        )
        self._read(
            CounterMetricFamily,
            "spegel_tx_dht_request_timeouts_total",
            "DHT requests a peer did not answer in time.",
            (),
            lambda: {(): counters["timeouts"]},
        )
        self._read(
            GaugeMetricFamily,
            "spegel_tx_dht_routing_table_peers",
            "Peers in this node's DHT routing table.",
            (),
            lambda: {(): len(protocol.table)},
        )
        self._read(
            GaugeMetricFamily,
            "spegel_tx_dht_records_stored",
            "Provider records this node holds for others.",
            (),
            lambda: {(): len(protocol.records)},
        )

    def watch_mirror(self, mirror: Any) -> None:
        """``mirror`` is the node's Mirror."""
        self._read(
            CounterMetricFamily,
            "spegel_tx_mirror_peer_events_total",
            "Forwarding events: second providers hedged, bodies resumed, digest "
            "mismatches, peers failed or without the content, quarantined peers tried.",
            ("event",),
            lambda: by_key(mirror.counters, PEER_EVENTS),
        )
        self._read(
            GaugeMetricFamily,
            "spegel_tx_peers_quarantined",
            "Peers skipped for now after refusing, timing out or sending bad content.",
            (),
            lambda: {(): len(mirror.health.quarantined_peers())},
        )

    def watch_state(self, tracker: Any) -> None:
        """``tracker`` is the node's StateTracker."""
        self._read(
            GaugeMetricFamily,
            "spegel_tx_first_wave_advertised",
            "Blobs advertised before their image: state=in_flight while containerd "
            "downloads them, committed once it has them.",
            ("state",),
            lambda: {(state,): float(n) for state, n in tracker.first_wave_counts().items()},
        )

        def counts(index: int) -> dict[Labels, float]:
            return self.registry_label.merge(
                {
                    registry: float(numbers[index])
                    for registry, numbers in tracker.advertised_by_registry().items()
                }
            )

        self._read(
            GaugeMetricFamily,
            "spegel_advertised_image_tags",
            "Image tags advertised to be available.",
            ("registry",),
            lambda: counts(0),
        )
        self._read(
            GaugeMetricFamily,
            "spegel_advertised_image_digests",
            "Image digests (what a tag names) advertised to be available.",
            ("registry",),
            lambda: counts(1),
        )
        self._read(
            GaugeMetricFamily,
            "spegel_advertised_content_digests",
            "Content digests (indexes, manifests, configs, layers) advertised.",
            ("registry",),
            lambda: counts(2),
        )


def _handler(path: bytes) -> str:
    """Spegel's handler label: its route pattern, so label values stay few."""
    if path.startswith(b"/v2/"):
        return "/v2/*"
    if path in (b"/readyz", b"/livez"):
        return path.decode()
    return "other"
