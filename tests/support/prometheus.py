"""Read a ``/metrics`` page as Prometheus would, and sum series as PromQL's ``sum`` does."""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


@dataclass(frozen=True)
class Scrape:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    types: dict[str, str]

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
    """Parse the text format strictly: a line that is not a comment or a sample fails."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if line.startswith("#") or not line:
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"not a sample line: {line!r}")
        name, label_text, value = match.groups()
        pairs = frozenset(
            (key, raw.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
            for key, raw in _LABEL.findall(label_text or "")
        )
        key = (name, pairs)
        if key in samples:
            raise ValueError(f"series given twice: {line!r}")
        samples[key] = float(value)
    return Scrape(samples, types)


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as response:
        content_type = response.headers["content-type"]
        assert content_type.startswith("text/plain; version=0.0.4"), content_type
        return parse(response.read().decode())
