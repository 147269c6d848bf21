"""The debug web page in a real browser, on the three-node cluster.

Headless Chromium (Debian's, driven by Playwright) opens the page of node B
while A and C hold the big image and B does not, reads what an operator would
read in its tables, measures a pull of the image from B, and checks that the
page asked nothing of anyone but the node that served it.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.support.cluster import (
    MirrorCluster,
    SpegelNode,
    keys_of,
    start_holding,
    start_without,
    wait_until_listed,
)
from tests.support.loopback import loopback_host
from tests.support.processes import free_ports, start_spegel, stop_process, wait_for_http

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 15_000
"""Longest a table may take to show what the test waits for (the measure moves 105 MiB)."""

WIDTH = 1280
"""The narrowest window the page must fit without a horizontal scroll bar."""


def overflow(page: Any) -> int:
    """Pixels the page is wider than the window (0 when it fits)."""
    return int(page.evaluate("document.documentElement.scrollWidth - window.innerWidth"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"needs {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@contextmanager
def debug_page(browser: Any, node: SpegelNode) -> Iterator[Any]:
    """The node's debug page, open; on leaving, every request it made went to the node's
    metrics address (nothing from outside the cluster, no CDN)."""
    page = browser.new_page(viewport={"width": WIDTH, "height": 900})
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    try:
        page.goto(f"{node.metrics_url}/debug/web/")
        page.wait_for_selector("#ready.ready, #ready.not-ready", timeout=WAIT_MS)
        yield page
    finally:
        page.close()
    strangers = [url for url in requested if not url.startswith(f"{node.metrics_url}/")]
    assert requested and not strangers, strangers


def rows(page: Any, table: str) -> list[list[str]]:
    """Each cell's text; for a size (shown as MiB), the exact bytes the page keeps with it."""
    return page.eval_on_selector_all(
        f"#{table} tbody tr",
        "rows => rows.map(row => Array.from(row.cells, c => c.dataset.bytes ?? c.textContent))",
    )


def seconds_ago(when: str) -> int:
    """The age the page gives a row: ``12:01:02 (3 s ago)``."""
    match = re.search(r"\((\d+) s ago\)", when)
    assert match, when
    return int(match.group(1))


def test_the_page_shows_peers_images_a_measured_pull_and_what_peers_served(
    mirror_cluster: MirrorCluster, browser: Any
) -> None:
    cluster = mirror_cluster
    a, b, c, big = cluster.a, cluster.b, cluster.c, cluster.big
    start_holding(cluster, a, big)
    start_holding(cluster, c, big)
    start_without(b, big)
    wait_until_listed(b, keys_of(big), [a, c])
    holders = {a.address, c.address}

    with debug_page(browser, a) as page:
        page.wait_for_function(
            "name => document.querySelector('#images').textContent.includes(name)",
            arg=big.name,
            timeout=WAIT_MS,
        )
        assert [big.name, big.index_digest] in rows(page, "images")

    with debug_page(browser, b) as page:
        assert overflow(page) == 0
        peers = {f"{host}:{port}" for _, host, port in rows(page, "peers")}
        assert {a.router_address, c.router_address} <= peers, peers

        page.fill("input[name=image]", big.name)
        with page.expect_response("**/api/measure") as answer:
            page.click("#measure button[type=submit]")
        print("measure:", json.dumps(answer.value.json(), indent=1))
        page.wait_for_selector("#measure-items:not([hidden])", timeout=WAIT_MS)
        measured = {row[0]: row for row in rows(page, "measure-items")}
        for digest in (big.config_digest, *big.layer_digests):
            _, _, size, peer, _, _, mb_per_s, error = measured[digest]
            assert (int(size), error) == (big.size(digest), ""), measured[digest]
            assert peer in holders and float(mb_per_s) > 0, measured[digest]
        total = page.eval_on_selector_all("#measure-total td", "cells => cells[2].dataset.bytes")
        assert int(total) == sum(big.size(digest) for digest in big.digests)

        pull_seconds = b.pull(big.name)
        page.click("#refresh")
        last_layer = big.layer_digests[-1]
        page.wait_for_function(
            "digest => document.querySelector('#mirrored').textContent.includes(digest)",
            arg=last_layer,
            timeout=WAIT_MS,
        )
        served: dict[str, list[str]] = {}
        for row in rows(page, "mirrored"):  # newest first: earlier tests' pulls come after
            served.setdefault(row[2], row)
        for digest in big.layer_digests:
            when, method, _, peer, status, size, _, mb_per_s, completed = served[digest]
            assert seconds_ago(when) <= pull_seconds + 5, f"not from this pull: {when}"
            assert (method, status, completed) == ("GET", "200", "yes"), served[digest]
            assert peer in holders and int(size) == big.size(digest), served[digest]
            assert float(mb_per_s) > 0
        assert page.text_content("#last-success") != "never"
        assert overflow(page) == 0, f"wider than {WIDTH} px"


def digest(n: int) -> str:
    return "sha256:" + f"{n:02x}" * 32


def crowded(node: dict[str, Any]) -> dict[str, Any]:
    """``node`` (a real api/node answer) with the longest things a cluster shows."""
    v6 = "fd00:10:244:1234:5678:9abc:def0:{:04x}"
    name = "registry.example.internal:5000/platform-team/a-rather-long-repository-name/{}:v1.2.3"
    return node | {
        "facts": node["facts"]
        | {"bootstrap": "static " + ", ".join(f"[{v6.format(n)}]:5001" for n in range(12))},
        "peers": [
            {"node_id": f"{n:02x}" * 32, "host": v6.format(n), "port": 5001} for n in range(30)
        ],
        "images": [{"name": name.format(n), "digest": digest(n)} for n in range(40)],
        "recent_mirrored": [
            {
                "at": 1_800_000_000.0,
                "ago_s": 12.3,
                "method": "GET",
                "path": "/v2/x/blobs/" + digest(n),
                "what": digest(n) if n % 2 else name.format(n).split("/", 1)[1],
                "status": 200,
                "peer": f"[{v6.format(n)}]:5000",
                "bytes": 1_234_567_890 + n,
                "seconds": 12.345678,
                "mb_per_s": 100.012345,
                "completed": True,
            }
            for n in range(100)
        ],
    }


def measured_with_failures() -> dict[str, Any]:
    failure = "[fd00:10:244:1234:5678:9abc:def0:0001]:5000: Connection was refused by other side"
    items = [
        {
            "digest": digest(n),
            "media_type": "application/vnd.oci.image.layer.v1.tar+gzip",
            "size": 64 << 20,
            "peer": "[fd00:10:244:1234:5678:9abc:def0:0002]:5000",
            "lookup_ms": 1.234,
            "fetch_s": 0.654321,
            "bytes": 64 << 20,
            "mb_per_s": 102.6,
            "error": None if n else "no provider of sha256:... served it",
            "tried": [failure] * (3 if n == 0 else 0),
        }
        for n in range(6)
    ]
    total = {"items": 6, "failed": 1, "bytes": 5 * (64 << 20), "fetch_s": 3.2}
    total |= {"mb_per_s": 104.9, "elapsed_s": 3.5}
    return {"image": "x", "error": "1 of 6 items failed", "items": items, "total": total}


def test_at_1280_px_nothing_overflows_and_the_page_says_why_it_is_not_ready(
    browser: Any, tmp_path: Any
) -> None:
    """One real node with no containerd and an absent peer; then the same page fed the
    longest ids, names, addresses and errors a cluster gives."""
    host = loopback_host()
    registry, router, metrics, absent = free_ports(host, 4)
    keys = {
        "registry-addr": f"{host}:{registry}",
        "router-addr": f"{host}:{router}",
        "metrics-addr": f"{host}:{metrics}",
        "containerd-sock": str(tmp_path / "no-containerd.sock"),
        "static-bootstrap-peers": [f"{host}:{absent}"],
        "debug-web-enabled": True,
    }
    process, log_path = start_spegel(keys, tmp_path / "node")
    url = f"http://{host}:{metrics}/debug/web/"
    try:
        wait_for_http(url, process, log_path, 30)
        page = browser.new_page(viewport={"width": WIDTH, "height": 900})
        page.goto(url)
        page.wait_for_selector("#ready.not-ready", timeout=WAIT_MS)
        reasons = page.eval_on_selector_all(
            "#not-ready li", "items => items.map(i => i.textContent)"
        )
        assert reasons == ["containerd is not reachable", "no DHT peer found yet"]
        assert page.text_content("#ready") == "not ready"
        page.screenshot(path=str(tmp_path / "not-ready.png"), full_page=True)

        with urllib.request.urlopen(url + "api/node", timeout=10) as response:
            node = crowded(json.loads(response.read()))
        page.route("**/api/node", lambda route: route.fulfill(json=node))
        page.route("**/api/measure", lambda route: route.fulfill(json=measured_with_failures()))
        page.click("#refresh")
        page.wait_for_function("document.querySelectorAll('#mirrored tbody tr').length == 100")
        page.fill("input[name=image]", "docker.io/library/nginx:1.27")
        page.click("#measure button[type=submit]")
        page.wait_for_selector("#measure-items:not([hidden])", timeout=WAIT_MS)
        page.screenshot(path=str(tmp_path / "crowded.png"), full_page=True)
        print("screenshots:", tmp_path / "not-ready.png", tmp_path / "crowded.png")
        assert overflow(page) == 0

        first = page.locator("#images tbody tr").first.locator(".hash")
        assert first.text_content() == first.get_attribute("title") == digest(0)
        shown = first.evaluate("span => span.clientWidth < span.scrollWidth")
        assert shown, "the digest is shortened on screen but whole in the text"
        size = page.locator("#mirrored tbody tr").first.locator("td").nth(5)
        assert (size.text_content(), size.get_attribute("data-bytes")) == (
            "1.1 GiB",
            "1234567890",
        )
        layer = page.locator("#measure-items tbody tr").nth(1).locator("td")
        assert [layer.nth(i).text_content() for i in (2, 6)] == ["64.0 MiB", "103"]
    finally:
        stop_process(process)
