"""Prometheus metrics in the text exposition format, written by hand.

No Prometheus client library is among the node's packages, and the format is
small. Names and labels of the metrics Spegel has are Spegel's, so its
dashboards and alerts keep working; ours are prefixed ``spegel_tx_``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from twisted.web.resource import Resource
from twisted.web.server import Request

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[str, ...]
"""Label values, in the order of the metric's label names."""

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds; Prometheus's default buckets, as Spegel uses them."""

SIZE_BUCKETS = tuple(1024.0 * 5**n for n in range(10))
"""Bytes from 1 KiB to about 2 GB, Spegel's buckets for response sizes."""


class Metric(Protocol):
    name: str
    help: str
    kind: str

    def samples(self) -> Iterable[tuple[str, Mapping[str, str], float]]:
        """``(name suffix, labels, value)`` for every series, read at scrape time."""
        ...


class _Labelled:
    def __init__(self, name: str, help: str, label_names: Sequence[str]) -> None:
        self.name = name
        self.help = help
        self.label_names = tuple(label_names)

    def _check(self, labels: Labels) -> Labels:
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {labels}")
        return labels

    def _pairs(self, labels: Labels) -> dict[str, str]:
        return dict(zip(self.label_names, labels, strict=True))


class Counter(_Labelled):
    kind = "counter"

    def __init__(self, name: str, help: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help, label_names)
        self._values: dict[Labels, float] = {} if label_names else {(): 0.0}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._check(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def samples(self) -> Iterator[tuple[str, Mapping[str, str], float]]:
        for labels, value in sorted(self._values.items()):
            yield "", self._pairs(labels), value


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        self._values[self._check(labels)] = value


class Histogram(_Labelled):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        label_names: Sequence[str] = (),
        buckets: Sequence[float] = DURATION_BUCKETS,
    ) -> None:
        super().__init__(name, help, label_names)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *labels: str) -> None:
        counts, total = self._series.setdefault(
            self._check(labels), ([0] * (len(self.buckets) + 1), [0.0])
        )
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                counts[index] += 1
                break
        else:
            counts[-1] += 1
        total[0] += value

    def samples(self) -> Iterator[tuple[str, Mapping[str, str], float]]:
        for labels, (counts, total) in sorted(self._series.items()):
            pairs = self._pairs(labels)
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += count
                yield "_bucket", {**pairs, "le": _number(bound)}, cumulative
            yield "_sum", pairs, total[0]
            yield "_count", pairs, cumulative


class Collected(_Labelled):
    """A counter or gauge read from the object that already keeps it, when scraped:
    the DHT's datagram counts, the routing table's size, what is advertised."""

    def __init__(
        self,
        kind: str,
        name: str,
        help: str,
        label_names: Sequence[str],
        read: Callable[[], Mapping[Labels, float]],
    ) -> None:
        super().__init__(name, help, label_names)
        self.kind = kind
        self._read = read

    def samples(self) -> Iterator[tuple[str, Mapping[str, str], float]]:
        for labels, value in sorted(self._read().items()):
            yield "", self._pairs(self._check(labels)), value


M = TypeVar("M", bound=Metric)


class MetricsRegistry:
    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def register(self, metric: M) -> M:
        if metric.name in self._metrics:
            raise ValueError(f"{metric.name} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> bytes:
        lines = []
        for metric in self._metrics.values():
            lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            for suffix, labels, value in metric.samples():
                lines.append(f"{metric.name}{suffix}{_labels(labels)} {_number(value)}")
        return ("\n".join(lines) + "\n").encode()


class MetricsResource(Resource):
    """``GET /metrics`` for Prometheus."""

    isLeaf = True

    def __init__(self, registry: MetricsRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE)
        return self._registry.render()


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    pairs = ",".join(f'{name}="{_escape_value(value)}"' for name, value in labels.items())
    return "{" + pairs + "}"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def by_key(counts: Mapping[Any, float], keys: Iterable[str]) -> dict[Labels, float]:
    """One series per name in ``keys``, zero where ``counts`` has none, so a series
    exists from the start and ``rate()`` sees its first increase."""
    return {(key,): float(counts.get(key, 0)) for key in keys}
