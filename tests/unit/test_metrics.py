"""The Prometheus text format, and what the node's metrics count, without sockets."""

from __future__ import annotations

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from spegel_tx.metrics import (
    CONTENT_TYPE,
    Collected,
    Counter,
    Gauge,
    Histogram,
    MetricsRegistry,
    MetricsResource,
)
from spegel_tx.nodemetrics import NodeMetrics
from spegel_tx.registry.access import RegistrySite
from spegel_tx.registry.app import Registry
from spegel_tx.testing import ControlledBlob, MemoryStore
from tests.support.prometheus import parse


def test_the_text_format_byte_for_byte():
    registry = MetricsRegistry()
    requests = registry.register(Counter("x_requests_total", "Requests.", ("registry", "cache")))
    registry.register(Gauge("x_last_seconds", 'A "help" with \\ and\nnewline.'))
    sizes = registry.register(Histogram("x_size_bytes", "Sizes.", ("handler",), (10, 100)))
    requests.inc("docker.io", "hit")
    requests.inc("docker.io", "hit", amount=2)
    requests.inc('we"ird\\\n', "miss")
    for value in (5, 50, 500):
        sizes.observe(value, "/v2/*")
    assert registry.render().decode() == (
        "# HELP x_requests_total Requests.\n"
        "# TYPE x_requests_total counter\n"
        'x_requests_total{registry="docker.io",cache="hit"} 3\n'
        'x_requests_total{registry="we\\"ird\\\\\\n",cache="miss"} 1\n'
        '# HELP x_last_seconds A "help" with \\\\ and\\nnewline.\n'
        "# TYPE x_last_seconds gauge\n"
        "x_last_seconds 0\n"
        "# HELP x_size_bytes Sizes.\n"
        "# TYPE x_size_bytes histogram\n"
        'x_size_bytes_bucket{handler="/v2/*",le="10"} 1\n'
        'x_size_bytes_bucket{handler="/v2/*",le="100"} 2\n'
        'x_size_bytes_bucket{handler="/v2/*",le="+Inf"} 3\n'
        'x_size_bytes_sum{handler="/v2/*"} 555\n'
        'x_size_bytes_count{handler="/v2/*"} 3\n'
    )


def test_a_parser_reads_back_what_was_written():
    registry = MetricsRegistry()
    counter = registry.register(Counter("c_total", "C.", ("label",)))
    counter.inc('quote " backslash \\ newline \n', amount=0.25)
    registry.register(Collected("gauge", "g", "G.", (), lambda: {(): 1.5e-7}))
    scrape = parse(registry.render().decode())
    assert scrape.value("c_total", label='quote " backslash \\ newline \n') == 0.25
    assert scrape.value("g") == 1.5e-7
    assert scrape.types == {"c_total": "counter", "g": "gauge"}


def test_wrong_labels_and_twice_registered_names_are_refused():
    registry = MetricsRegistry()
    counter = registry.register(Counter("c_total", "C.", ("registry", "cache")))
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc("docker.io")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Gauge("c_total", "again"))


def test_the_resource_answers_with_prometheus_content_type():
    registry = MetricsRegistry()
    registry.register(Counter("c_total", "C.")).inc()
    request = DummyRequest([b""])
    body = MetricsResource(registry).render_GET(request)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [CONTENT_TYPE]
    assert parse(body.decode()).value("c_total") == 1


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

    scrape = parse(metrics.registry.render().decode())
    assert scrape.value("http_request_duration_seconds_count", handler="/v2/*", code="200") == 1
    assert scrape.value("http_request_duration_seconds_count", handler="/v2/*", code="404") == 1
    assert scrape.value("http_request_duration_seconds_count", handler="/readyz") == 1
    assert scrape.value("http_response_size_bytes_sum", handler="/v2/*", code="200") == 5000
    assert scrape.value("http_requests_inflight") == 0
    assert scrape.value("spegel_tx_served_bytes_total", source="local") == 5000
    assert scrape.value("spegel_tx_upstream_fallbacks_total", registry="docker.io") == 1


def test_a_request_cut_off_mid_body_leaves_nothing_in_flight():
    store = MemoryStore()
    digest = store.add_blob(b"y" * ControlledBlob.size)
    store.open = lambda digest: succeed(ControlledBlob())  # type: ignore[method-assign]
    metrics = NodeMetrics(Clock())
    site = RegistrySite(Registry(MemoryReactor(), store).resource(), metrics)
    channel = site.buildProtocol(None)
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET /v2/a/blobs/%s HTTP/1.1\r\n\r\n" % digest.encode())
    assert metrics.http_inflight.value("/v2/*") == 1
    channel.connectionLost(Failure(ConnectionError("gone")))
    assert metrics.http_inflight.value("/v2/*") == 0


def test_forwarded_requests_count_hits_misses_and_the_last_success():
    clock = Clock()
    clock.advance(1_700_000_000)
    metrics = NodeMetrics(clock)
    metrics.forwarded("docker.io", served=True)
    metrics.forwarded("docker.io", served=False)
    metrics.forwarded("ghcr.io", served=False)
    scrape = parse(metrics.registry.render().decode())
    assert scrape.value("spegel_mirror_requests_total", registry="docker.io", cache="hit") == 1
    assert scrape.value("spegel_mirror_requests_total", cache="miss") == 2
    assert scrape.value("spegel_mirror_last_success_timestamp_seconds") == 1_700_000_000


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
    assert metrics.served_bytes.value("peer") == 1234
