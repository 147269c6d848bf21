"""The Grafana dashboard queries only metrics spegel-tx exports, by labels they carry."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.support.processes import ROOT

DASHBOARD = ROOT / "deploy" / "helm" / "spegel-tx" / "dashboards" / "spegel-tx.json"
# Name: labels, as /metrics exports them (Spegel's names, then ours).
METRICS: dict[str, set[str]] = {
    "spegel_mirror_requests_total": {"registry", "cache"},
    "spegel_mirror_last_success_timestamp_seconds": set(),
    "spegel_resolve_duration_seconds": {"router"},
    "spegel_advertised_image_tags": {"registry"},
    "spegel_advertised_image_digests": {"registry"},
    "spegel_advertised_content_digests": {"registry"},
    "http_request_duration_seconds": {"handler", "method", "code"},
    "http_response_size_bytes": {"handler", "method", "code"},
    "http_requests_inflight": {"handler"},
    "spegel_tx_served_bytes_total": {"source"},
    "spegel_tx_upstream_fallbacks_total": {"registry"},
    "spegel_tx_dht_datagrams_total": {"direction"},
    "spegel_tx_dht_bytes_total": {"direction"},
    "spegel_tx_dht_dropped_datagrams_total": {"reason"},
    "spegel_tx_dht_routing_table_peers": set(),
    "spegel_tx_mirror_peer_events_total": {"event"},
    "spegel_tx_peers_quarantined": set(),
}
HISTOGRAMS = {
    "spegel_resolve_duration_seconds",
    "http_request_duration_seconds",
    "http_response_size_bytes",
}
# Labels Prometheus adds to every scraped series (the ServiceMonitor's target labels).
TARGET_LABELS = {"pod", "namespace", "instance", "job", "service", "container", "endpoint"}
SERIES = re.compile(r"\b((?:spegel|http)_[a-z_]+)(?:\{([^}]*)\})?")
GROUPING = re.compile(r"\bby \(([^)]*)\)")


def base_name(series: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if series.endswith(suffix) and series.removesuffix(suffix) in HISTOGRAMS:
            return series.removesuffix(suffix)
    return series


def expressions(dashboard: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    variables = dashboard["templating"]["list"]
    return queries + [v["definition"] for v in variables if v["type"] == "query"]


def test_dashboard_queries_only_exported_metrics_and_labels():
    dashboard = json.loads(DASHBOARD.read_text())
    used = set()
    for expr in expressions(dashboard):
        names = set()
        for series, matchers in SERIES.findall(expr):
            name = base_name(series)
            assert name in METRICS, f"{series} in {expr!r}"
            labels = set(re.findall(r"(\w+)\s*=~?", matchers))
            allowed = METRICS[name] | TARGET_LABELS
            assert labels <= allowed, f"{expr!r}"
            names.add(name)
        assert names, f"no spegel-tx metric in {expr!r}"
        grouped = {label.strip() for group in GROUPING.findall(expr) for label in group.split(",")}
        labels = set().union(*(METRICS[n] for n in names)) | TARGET_LABELS | {"le"}
        assert grouped <= labels, f"{expr!r} groups by a label its metrics lack"
        used |= names
    assert used == set(METRICS), "every exported metric has a panel"


def test_dashboard_panels_use_the_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "spegel-tx"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]


def test_there_is_one_copy_of_the_dashboard():
    """deploy/grafana/spegel-tx.json is for Grafana users; Helm reads only inside the chart."""
    public = ROOT / "deploy" / "grafana" / "spegel-tx.json"
    assert public.is_symlink()
    assert public.resolve() == DASHBOARD.resolve()
