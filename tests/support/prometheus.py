"""Read a ``/metrics`` page with prometheus_client's own parser, and sum series as
PromQL's ``sum`` does."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    types: dict[str, str]
    """Family name (a counter's without ``_total``, as the parser names it): type."""

    def value(self, name: str, **labels: str) -> float:
        """The sum of every series of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(
            value
            for (sample, pairs), value in self.samples.items()
            if sample == name and wanted <= pairs
        )

    def series(self, name: str) -> list[dict[str, str]]:
        return [dict(pairs) for (sample, pairs) in self.samples if sample == name]


def parse(text: str) -> Scrape:
    """Parse the text format; the parser fails on a malformed line, and a series given
    twice fails here."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            if key in samples:
                raise ValueError(f"series given twice: {sample}")
            samples[key] = sample.value
    return Scrape(samples, types)


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as response:
        content_type = response.headers["content-type"]
        assert content_type.startswith("text/plain; version=0.0.4"), content_type
        return parse(response.read().decode())
