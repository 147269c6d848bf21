"""What the node's metrics count, as prometheus_client's own parsers read ``/metrics``,
without sockets."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import sys

import pytest
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from spegel_tx.metrics import OTHER_REGISTRY, REGISTRY_LABEL_LIMIT, MetricsResource
from spegel_tx.nodemetrics import PEER_EVENTS, NodeMetrics
from spegel_tx.registry.access import RegistrySite
from spegel_tx.registry.app import Registry
from spegel_tx.registry.mirror import Mirror
from spegel_tx.routing.kademlia.protocol import KademliaProtocol
from spegel_tx.routing.memory import MemoryRoutingTable
from spegel_tx.state import StateTracker
from spegel_tx.testing import ControlledBlob, MemoryStore
from tests.deploy.test_grafana_dashboard import METRICS as DASHBOARD_METRICS
from tests.support.processes import ROOT
from tests.support.prometheus import Scrape, parse

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def get(metrics: NodeMetrics, **headers: str) -> tuple[DummyRequest, bytes]:
    request = DummyRequest([b""])
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.replace("_", "-"), [value])
    return request, MetricsResource(metrics.registry).render_GET(request)


def scrape(metrics: NodeMetrics) -> Scrape:
    request, body = get(metrics)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"text/plain; version=0.0.4; charset=utf-8"
    ]
    return parse(body.decode())


def test_the_resource_serves_the_text_format_by_default():
    metrics = NodeMetrics(Clock())
    metrics.forwarded("docker.io", served=True)
    assert scrape(metrics).value("spegel_mirror_requests_total", cache="hit") == 1


def test_openmetrics_when_prometheus_asks_for_it():
    metrics = NodeMetrics(Clock())
    metrics.forwarded("docker.io", served=False)
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    request, body = get(metrics, accept=accept)
    [content_type] = request.responseHeaders.getRawHeaders(b"content-type")
    assert content_type.startswith(b"application/openmetrics-text; version=1.0.0")
    families = {f.name: f for f in openmetrics_families(body.decode())}
    [sample] = families["spegel_mirror_requests"].samples
    assert (sample.name, sample.labels, sample.value) == (
        "spegel_mirror_requests_total",
        {"registry": "docker.io", "cache": "miss"},
        1,
    )


def test_gzip_when_accepted():
    metrics = NodeMetrics(Clock())
    metrics.forwarded("docker.io", served=True)
    request, body = get(metrics, accept_encoding="gzip")
    assert request.responseHeaders.getRawHeaders(b"content-encoding") == [b"gzip"]
    text = gzip.decompress(body).decode()
    assert parse(text).value("spegel_mirror_requests_total") == 1


def test_no_created_series_beside_counters_and_histograms():
    """Spegel exports none; each would double the series of a counter."""
    metrics = NodeMetrics(Clock())
    metrics.forwarded("docker.io", served=True)
    metrics.resolved(0.01)
    assert "_created" not in get(metrics)[1].decode()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="read from /proc")
def test_the_process_metrics_the_library_reads_from_proc():
    found = scrape(NodeMetrics(Clock()))
    assert found.value("process_resident_memory_bytes") > 10 * 2**20
    assert found.value("process_cpu_seconds_total") > 0
    open_now = len(os.listdir("/proc/self/fd"))
    assert abs(found.value("process_open_fds") - open_now) <= 2
    assert found.series("python_info")


def test_each_node_has_its_own_registry_not_the_global_one():
    one, two = NodeMetrics(Clock()), NodeMetrics(Clock())
    one.forwarded("docker.io", served=True)
    assert scrape(two).value("spegel_mirror_requests_total") == 0
    sample = {"registry": "docker.io", "cache": "hit"}
    assert REGISTRY.get_sample_value("spegel_mirror_requests_total", sample) is None


def serve(site: RegistrySite, raw: bytes) -> StringTransport:
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    return transport


def test_registry_requests_feed_spegels_http_metrics_and_bytes_served():
    store = MemoryStore()
    layer = b"x" * 5000
    digest = store.add_blob(layer)
    metrics = NodeMetrics(Clock())
    site = RegistrySite(Registry(MemoryReactor(), store).resource(), metrics)

    serve(site, b"GET /v2/a/blobs/%s HTTP/1.1\r\nHost: n\r\n\r\n" % digest.encode())
    serve(site, b"GET /v2/a/blobs/sha256:%s?ns=docker.io HTTP/1.1\r\n\r\n" % (b"0" * 64))
    serve(site, b"GET /readyz HTTP/1.1\r\n\r\n")

    found = scrape(metrics)
    assert found.value("http_request_duration_seconds_count", handler="/v2/*", code="200") == 1
    assert found.value("http_request_duration_seconds_count", handler="/v2/*", code="404") == 1
    assert found.value("http_request_duration_seconds_count", handler="/readyz") == 1
    assert found.value("http_response_size_bytes_sum", handler="/v2/*", code="200") == 5000
    assert found.value("http_requests_inflight") == 0
    assert found.value("spegel_tx_served_bytes_total", source="local") == 5000
    assert found.value("spegel_tx_upstream_fallbacks_total", registry="docker.io") == 1


def test_histograms_keep_spegels_buckets():
    metrics = NodeMetrics(Clock())
    metrics.resolved(0.3)
    metrics.request_finished(b"/v2/", "GET", 200, 6000, 0.07, "-", "", "-", True)
    found = scrape(metrics)
    durations = [s["le"] for s in found.series("http_request_duration_seconds_bucket")]
    assert durations == [
        *("0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0"),
        "+Inf",
    ]
    assert found.value("http_request_duration_seconds_bucket", le="0.1") == 1
    assert found.value("http_request_duration_seconds_bucket", le="0.05") == 0
    sizes = [float(s["le"]) for s in found.series("http_response_size_bytes_bucket")]
    assert sizes[:3] == [1024, 5120, 25600] and len(sizes) == 11
    assert found.value("http_response_size_bytes_bucket", le="5120.0") == 0
    assert found.value("http_response_size_bytes_bucket", le="25600.0") == 1
    assert found.value("spegel_resolve_duration_seconds_bucket", router="kademlia", le="0.5") == 1


def test_a_request_cut_off_mid_body_leaves_nothing_in_flight():
    store = MemoryStore()
    digest = store.add_blob(b"y" * ControlledBlob.size)
    store.open = lambda digest: succeed(ControlledBlob())  # type: ignore[method-assign]
    metrics = NodeMetrics(Clock())
    site = RegistrySite(Registry(MemoryReactor(), store).resource(), metrics)
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET /v2/a/blobs/%s HTTP/1.1\r\n\r\n" % digest.encode())
    assert scrape(metrics).value("http_requests_inflight", handler="/v2/*") == 1
    channel.connectionLost(Failure(ConnectionError("gone")))
    assert scrape(metrics).value("http_requests_inflight", handler="/v2/*") == 0


def test_forwarded_requests_count_hits_misses_and_the_last_success():
    clock = Clock()
    clock.advance(1_700_000_000)
    metrics = NodeMetrics(clock)
    metrics.forwarded("docker.io", served=True)
    metrics.forwarded("docker.io", served=False)
    metrics.forwarded("ghcr.io", served=False)
    found = scrape(metrics)
    assert found.value("spegel_mirror_requests_total", registry="docker.io", cache="hit") == 1
    assert found.value("spegel_mirror_requests_total", cache="miss") == 2
    assert found.value("spegel_mirror_last_success_timestamp_seconds") == 1_700_000_000


def test_mirrored_requests_are_kept_for_the_debug_page_and_counted_as_peer_bytes():
    metrics = NodeMetrics(Clock())
    metrics.request_started(b"/v2/a/blobs/sha256:1")
    metrics.request_finished(
        b"/v2/a/blobs/sha256:1",
        "GET",
        200,
        1234,
        0.5,
        served_by="mirror",
        registry="docker.io",
        peer="10.0.0.2:5000",
        completed=True,
    )
    [recent] = metrics.recent_mirrored
    assert (recent.peer, recent.bytes, recent.seconds) == ("10.0.0.2:5000", 1234, 0.5)
    assert scrape(metrics).value("spegel_tx_served_bytes_total", source="peer") == 1234


# The registry label: what a request's ns says, from a bounded set of values


def not_found(metrics: NodeMetrics, registry: str) -> None:
    path = b"/v2/a/blobs/sha256:0"
    metrics.request_started(path)
    metrics.request_finished(path, "GET", 404, 0, 0.001, "-", registry, "-", True)


def test_registries_not_mirrored_share_the_label_other():
    metrics = NodeMetrics(Clock(), mirrored_registries=("docker.io", "ghcr.io"))
    for ns in ("docker.io", "evil.example", "x" * 200, 'we"ird\\\n', ""):
        metrics.forwarded(ns, served=False)
        not_found(metrics, ns)
    found = scrape(metrics)
    for name in ("spegel_mirror_requests_total", "spegel_tx_upstream_fallbacks_total"):
        assert sorted(s["registry"] for s in found.series(name)) == ["docker.io", "other"]
        assert found.value(name, registry="other") == 4


def test_with_every_registry_mirrored_the_first_fifty_keep_their_names():
    metrics = NodeMetrics(Clock())
    for n in range(REGISTRY_LABEL_LIMIT + 30):
        metrics.forwarded(f"r{n}.example", served=True)
    metrics.forwarded("r0.example", served=False)
    found = scrape(metrics)
    labels = {s["registry"] for s in found.series("spegel_mirror_requests_total")}
    assert labels == {f"r{n}.example" for n in range(REGISTRY_LABEL_LIMIT)} | {OTHER_REGISTRY}
    assert found.value("spegel_mirror_requests_total", registry=OTHER_REGISTRY) == 30
    assert found.value("spegel_mirror_requests_total", registry="r0.example", cache="miss") == 1


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tracker_holding(registries: list[str], mirrored: tuple[str, ...] = ()) -> StateTracker:
    config = b"{}"
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "x", "digest": digest_of(config), "size": len(config)},
            "layers": [],
        }
    ).encode()
    store = MemoryStore(
        [config, manifest], {f"{r}/library/a:1": digest_of(manifest) for r in registries}
    )
    router = MemoryRoutingTable().router("10.0.0.1", 5000)
    tracker = StateTracker(Clock(), store, router, mirrored)
    tracker.startService()
    return tracker


def test_advertised_counts_of_registries_past_the_limit_add_up_under_other():
    registries = [f"r{n:02}.example" for n in range(REGISTRY_LABEL_LIMIT + 5)]
    metrics = NodeMetrics(Clock())
    metrics.watch_state(tracker_holding(registries))
    found = scrape(metrics)
    assert len(found.series("spegel_advertised_image_tags")) == REGISTRY_LABEL_LIMIT + 1
    assert found.value("spegel_advertised_image_tags") == len(registries)
    assert found.value("spegel_advertised_image_tags", registry=OTHER_REGISTRY) == 5
    assert found.value("spegel_advertised_content_digests", registry="r00.example") == 2


# What is exported: the README's table, the dashboard's metrics


def every_metric() -> NodeMetrics:
    """A node's metrics with the DHT, the mirror and the advertised state watched."""
    clock = Clock()
    metrics = NodeMetrics(clock, ("docker.io",))
    protocol = KademliaProtocol(clock, b"\x01" * 32, registry_port=5000)
    protocol.counters.update(datagrams_in=3, bytes_out=120, dropped_auth=2, timeouts=1)
    metrics.watch_dht(protocol)
    metrics.watch_mirror(Mirror(clock, MemoryRoutingTable().router("10.0.0.1", 5000), None))
    metrics.watch_state(tracker_holding(["docker.io"], ("docker.io",)))
    metrics.forwarded("docker.io", served=True)
    metrics.resolved(0.01)
    metrics.request_started(b"/v2/")
    metrics.request_finished(b"/v2/", "GET", 404, 0, 0.01, "local", "docker.io", "-", True)
    return metrics


def documented() -> dict[str, tuple[str, set[str]]]:
    """The README's metrics table: name -> (type, label names)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \|([^|]*)\|", section, re.MULTILINE)
    assert rows, "no metrics table in the README"
    return {name: (kind, set(re.findall(r"`(\w+)", labels))) for name, kind, labels in rows}


def exported(found: Scrape) -> dict[str, tuple[str, set[str]]]:
    """Name as a query writes it -> (type, label names), from a scrape."""
    result: dict[str, tuple[str, set[str]]] = {}
    for family, kind in found.types.items():
        name = family + "_total" if kind == "counter" else family
        names = {family + suffix for suffix in ("", "_total", "_bucket", "_sum", "_count")}
        labels = {label for sample, pairs in found.samples if sample in names for label, _ in pairs}
        labels.discard("le")
        result[name] = (kind, labels)
    return result


def test_the_readme_table_is_what_is_exported():
    found = exported(scrape(every_metric()))
    table = documented()
    assert {name: found.get(name) for name in table} == table
    ours = {name for name in found if name.startswith(("spegel_", "http_"))}
    assert ours == {name for name in table if name.startswith(("spegel_", "http_"))}


def test_the_dashboards_metrics_are_exported_with_their_labels():
    found = exported(scrape(every_metric()))
    assert {name: found[name][1] for name in DASHBOARD_METRICS} == DASHBOARD_METRICS


def test_every_peer_event_has_a_series_from_the_start():
    found = scrape(every_metric())
    events = [s["event"] for s in found.series("spegel_tx_mirror_peer_events_total")]
    assert sorted(events) == sorted(PEER_EVENTS)
    assert found.value("spegel_tx_dht_dropped_datagrams_total", reason="auth") == 2
    assert found.value("spegel_tx_dht_request_timeouts_total") == 1
