"""The mirror behaviours the README lists, on real processes: hedging a slow provider,
resuming a stalled body, cutting off a wrong digest and keeping that peer last,
leaving a trickling peer, and the end of a quarantine.

Node B (``twistd -n spegel`` over an empty containerd namespace) is asked for a layer
of the session's demo image. Its providers are the hostile peer
(``tests/support/hostile_peer.py``), which advertises first, and node H, which holds
the image in its containerd and starts after: every node keeps its records in the
order they came, so B tries the hostile peer first. What B did is read from its
``/metrics``, as an operator would.
"""

from __future__ import annotations

import hashlib
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_hostile_peers import Liar, fetch, liar_joining
from tests.support.loopback import loopback_host
from tests.support.processes import poll
from tests.support.prometheus import scrape

pytestmark = pytest.mark.integration


def providers(node: Any, key: str) -> set[str]:
    url = f"{node.metrics_url}/debug/lookup?key={urllib.parse.quote(key)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return {
            f"{p['host']}:{p['registry_port']}" for p in json.loads(response.read())["providers"]
        }


def events(node: Any, event: str) -> float:
    return scrape(f"{node.metrics_url}/metrics").value(
        "spegel_tx_mirror_peer_events_total", event=event
    )


def quarantined(node: Any) -> float:
    return scrape(f"{node.metrics_url}/metrics").value("spegel_tx_peers_quarantined")


class Scene:
    """B, and H's keys, ready to start H once the hostile peer has advertised."""

    def __init__(self, spegel_node: Callable[..., Any], containerd: Any, **b_keys: Any) -> None:
        self._spegel_node = spegel_node
        self._containerd = containerd
        self._h_host = loopback_host()
        self._h_keys = containerd.node_keys(self._h_host)
        self.b = spegel_node(
            containerd,
            wait_ready=False,
            containerd_namespace="holds-nothing",
            static_bootstrap_peers=self._h_keys["router-addr"],
            **b_keys,
        )

    def start_h(self, layer: str, liar: Liar) -> Any:
        h = self._spegel_node(
            self._containerd,
            host=self._h_host,
            static_bootstrap_peers=self.b.router_address,
            **self._h_keys,
        )
        both = {liar.address, h.address}
        assert poll(lambda: both <= providers(self.b, layer), 30), providers(self.b, layer)
        return h

    def url(self, image: Any, digest: str) -> str:
        return f"{self.b.url}/v2/{image.repository}/blobs/{digest}?ns=registry.test"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def scene(spegel_node: Callable[..., Any], containerd: Any) -> Callable[..., Scene]:
    return lambda **b_keys: Scene(spegel_node, containerd, **b_keys)


def test_a_provider_slow_to_answer_is_raced_by_the_next(
    scene: Callable[..., Scene], demo_image: Any, tmp_path: Path
) -> None:
    """The first provider sends nothing for 5 s; B has given it 30 s for its headers, so
    only the hedge can bring H in before then."""
    s = scene(mirror_response_timeout="30s")
    layer = demo_image.layer_digests[-1]
    with liar_joining(s.b.router_address, tmp_path, "late", [layer]) as liar:
        s.start_h(layer, liar)
        started = time.monotonic()
        status, body, whole = fetch(s.url(demo_image, layer))
        seconds = time.monotonic() - started
        asked = liar.requests()
    assert asked, "the slow provider was never asked: the test proves nothing"
    assert (status, whole, digest_of(body)) == (200, True, layer)
    assert seconds < 5.0, f"{seconds:.2f} s: the slow provider was waited out, not raced"
    assert events(s.b, "hedged") >= 1


def test_a_body_that_stalls_resumes_from_another_provider(
    scene: Callable[..., Scene], demo_image: Any, tmp_path: Path
) -> None:
    """The first provider sends half the layer, then nothing, its connection open."""
    s = scene(mirror_idle_timeout="1s")
    layer = demo_image.layer_digests[-1]
    blob = demo_image.blob_path(layer)
    with liar_joining(
        s.b.router_address, tmp_path, "stall", [layer], "--blob-file", str(blob)
    ) as liar:
        s.start_h(layer, liar)
        status, body, whole = fetch(s.url(demo_image, layer))
        asked = liar.requests()
    assert asked, "the stalling provider was never asked: the test proves nothing"
    assert (status, whole, digest_of(body)) == (200, True, layer)
    assert events(s.b, "resumed") >= 1


def test_a_wrong_digest_is_cut_off_and_that_peer_stays_last_past_the_quarantine(
    scene: Callable[..., Scene], demo_image: Any, tmp_path: Path
) -> None:
    """The liar sends the layer's size in random bytes. Alone, it gets B's client cut
    off short of the whole; then H serves the layer, and the liar stays quarantined
    after mirror-peer-quarantine (2 s) has passed: a wrong digest costs 10 minutes."""
    s = scene(mirror_peer_quarantine="2s")
    layer = demo_image.layer_digests[-1]
    size = str(demo_image.size(layer))
    with liar_joining(s.b.router_address, tmp_path, "wrong", [layer], "--blob-size", size) as liar:
        status, body, whole = fetch(s.url(demo_image, layer))
        assert liar.requests(), "the liar was never asked: the test proves nothing"
        assert status == 200 and not whole, f"{status}, {len(body)} bytes, whole={whole}"
        assert len(body) < demo_image.size(layer), "its last chunk was held back"
        assert events(s.b, "digest_mismatch") == 1
        s.start_h(layer, liar)
        honest = [fetch(s.url(demo_image, layer)) for _ in range(2)]
        time.sleep(3)
        still = quarantined(s.b)
    for status, body, whole in honest:
        assert (status, whole, digest_of(body)) == (200, True, layer)
    assert still == 1, "the liar left quarantine with the 2 s one"


def test_a_trickling_peer_is_left_and_its_quarantine_ends(
    scene: Callable[..., Scene], demo_image: Any, tmp_path: Path
) -> None:
    """The first provider sends the right bytes, one every 4 s: under mirror-min-throughput
    over 10 s, B leaves it for H, and keeps it last for mirror-peer-quarantine (5 s),
    though it answers; then the quarantine ends."""
    s = scene(mirror_peer_quarantine="5s")
    layer = demo_image.layer_digests[-1]
    blob = demo_image.blob_path(layer)
    with liar_joining(
        s.b.router_address, tmp_path, "trickle", [layer], "--blob-file", str(blob)
    ) as liar:
        s.start_h(layer, liar)
        status, body, whole = fetch(s.url(demo_image, layer))
        left = time.monotonic()
        held = quarantined(s.b)
        asked = liar.requests()
        ended = poll(lambda: quarantined(s.b) == 0, 15)
        seconds = time.monotonic() - left
    assert asked, "the trickling provider was never asked: the test proves nothing"
    assert (status, whole, digest_of(body)) == (200, True, layer)
    assert events(s.b, "resumed") >= 1
    assert held == 1, "the trickling peer is quarantined"
    assert ended, f"still quarantined {seconds:.1f} s after it was left"
