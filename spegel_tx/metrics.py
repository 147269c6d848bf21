"""Prometheus exposition through ``prometheus_client``, and what it does not do for us.

The library keeps counters, gauges and histograms and writes both text formats. Two
things are ours: counts that another part already keeps, read when Prometheus scrapes
(:class:`ReadAtScrape`), and a bound on the values a ``registry`` label can take, since
the value comes from a request's ``ns`` parameter and anyone reaching the node picks it
(:class:`RegistryLabels`).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client import disable_created_metrics
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.web.resource import Resource
from twisted.web.server import Request

# Spegel (Go's client) exports no ``_created`` series; without this every counter and
# histogram series would bring a second one.
disable_created_metrics()

Labels = tuple[str, ...]
"""Label values, in the order of the metric's label names."""

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds: Go's default buckets, as Spegel uses them (prometheus_client's default adds
0.075, 0.75 and 7.5, which would change the ``le`` values dashboards see)."""

SIZE_BUCKETS = tuple(1024.0 * 5**n for n in range(10))
"""Bytes from 1 KiB to about 2 GB, Spegel's buckets for response sizes."""

OTHER_REGISTRY = "other"
"""The ``registry`` label of every registry not given a label of its own."""

REGISTRY_LABEL_LIMIT = 50
"""Distinct ``registry`` values kept when every registry is mirrored."""


class RegistryLabels:
    """The ``registry`` label for a registry name, from a bounded set of values.

    With ``mirrored-registries`` set, those registries keep their names and every other
    value is ``other``. With none set (all registries are mirrored), the first ``limit``
    names seen keep theirs and later ones are ``other``, so a client sending a new
    ``ns`` with each request cannot grow the node's memory or Prometheus's series.
    """

    def __init__(self, mirrored: Iterable[str] = (), limit: int = REGISTRY_LABEL_LIMIT) -> None:
        self._mirrored = frozenset(mirrored)
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, registry: str) -> str:
        if self._mirrored:
            return registry if registry in self._mirrored else OTHER_REGISTRY
        if registry in self._seen:
            return registry
        if len(self._seen) < self._limit:
            self._seen.add(registry)
            return registry
        return OTHER_REGISTRY

    def merge(self, counts: Mapping[str, float]) -> dict[Labels, float]:
        """Counts by registry name, summed under their labels."""
        merged: dict[Labels, float] = {}
        for registry, value in counts.items():
            key = (self(registry),)
            merged[key] = merged.get(key, 0.0) + value
        return merged


class ReadAtScrape(Collector):
    """A counter or gauge read from the object that already keeps it, when scraped:
    the DHT's datagram counts, the routing table's size, what is advertised."""

    def __init__(
        self,
        family: type[CounterMetricFamily] | type[GaugeMetricFamily],
        name: str,
        documentation: str,
        label_names: Sequence[str],
        read: Callable[[], Mapping[Labels, float]],
    ) -> None:
        self._family = family
        self._name = name
        self._documentation = documentation
        self._label_names = list(label_names)
        self._read = read

    def _empty(self) -> CounterMetricFamily | GaugeMetricFamily:
        return self._family(self._name, self._documentation, labels=self._label_names)

    def describe(self) -> Iterator[Metric]:
        """Names only, so registering does not read the counts."""
        yield self._empty()

    def collect(self) -> Iterator[Metric]:
        family = self._empty()
        for labels, value in sorted(self._read().items()):
            family.add_metric(list(labels), value)
        yield family


class MetricsResource(Resource):
    """``GET /metrics``: what prometheus_client's own web handlers answer (the text
    format, or OpenMetrics when asked; gzip when accepted), rendered on the reactor.

    ``prometheus_client.twisted.MetricsResource`` renders in a thread of the global
    reactor's pool; the counts :class:`ReadAtScrape` reads belong to the reactor thread.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        encode, content_type = choose_encoder(_header(request, b"accept"))
        body = encode(self._registry)
        request.setHeader(b"content-type", content_type.encode())
        if gzip_accepted(_header(request, b"accept-encoding")):
            request.setHeader(b"content-encoding", b"gzip")
            return gzip.compress(body)
        return body


def _header(request: Request, name: bytes) -> str:
    value = request.getHeader(name)
    return value.decode("latin-1") if value is not None else ""


def by_key(counts: Mapping[str, float], keys: Iterable[str]) -> dict[Labels, float]:
    """One series per name in ``keys``, zero where ``counts`` has none, so a series
    exists from the start and ``rate()`` sees its first increase."""
    return {(key,): float(counts.get(key, 0)) for key in keys}
