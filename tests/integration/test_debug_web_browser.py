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

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 15_000
"""Longest a table may take to show what the test waits for (the measure moves 105 MiB)."""


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
    page = browser.new_page()
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
    return page.eval_on_selector_all(
        f"#{table} tbody tr",
        "rows => rows.map(row => Array.from(row.cells, cell => cell.textContent))",
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
        total = page.eval_on_selector_all("#measure-total td", "cells => cells[2].textContent")
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
