"""A peer that lies over HTTP never gets wrong bytes to a client, nor holds one for long.

The hostile peer (``tests/support/hostile_peer.py``) joins the three-node cluster's
DHT with spegel-tx's own router code, advertises content it does not hold, and
answers it with lies. B's node is asked for that content, first with the liar as
the only provider (the answer must be a 404 or a cut connection, never a whole
wrong body, and come within the mirror's bounds), then with A holding the real
content too (the client gets the right bytes).
"""

from __future__ import annotations

import hashlib
import http.client
import sys
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.cluster import (
    MirrorCluster,
    start_holding,
    start_without,
    wait_until_listed,
)
from tests.support.loopback import loopback_host
from tests.support.processes import ROOT, free_ports, log_tail, poll, start_process, stop_process

pytestmark = pytest.mark.integration

ANSWER_WITHIN = 60.0
"""A generous bound on one request through B: a 10 s pace window, then the 10 s resume wait."""


class Liar:
    def __init__(self, host: str, registry_port: int, log_path: Path) -> None:
        self.address = f"{host}:{registry_port}"
        self.log_path = log_path

    def requests(self) -> list[str]:
        lines = self.log_path.read_text().splitlines()
        return [line for line in lines if line.split(" ", 1)[0] in ("GET", "HEAD")]


@contextmanager
def hostile_peer(cluster: MirrorCluster, mode: str, keys: list[str], *extra: str) -> Iterator[Liar]:
    with liar_joining(cluster.a.router_address, cluster.base, mode, keys, *extra) as liar:
        yield liar


@contextmanager
def liar_joining(
    bootstrap: str, base: Path, mode: str, keys: list[str], *extra: str
) -> Iterator[Liar]:
    """The hostile peer, joined to the DHT through the router at ``bootstrap``, once it
    has advertised ``keys``; its log goes under ``base``."""
    host = loopback_host()  # its own address: a node keeps one record per key and address
    router_port, registry_port = free_ports(host, 2)
    log_path = base / f"hostile-{mode}-{registry_port}.log"
    args = [sys.executable, "-m", "tests.support.hostile_peer", "--mode", mode]
    args += ["--bootstrap", bootstrap, "--host", host]
    args += ["--router-port", str(router_port), "--registry-port", str(registry_port)]
    for key in keys:
        args += ["--key", key]
    process = start_process([*args, *extra], log_path, cwd=ROOT)
    try:
        ready = poll(lambda: "ready" in log_path.read_text().split(), 30)
        assert ready, f"the hostile peer did not advertise:\n{log_tail(log_path)}"
        yield Liar(host, registry_port, log_path)
    finally:
        stop_process(process)


def fetch(url: str) -> tuple[int, bytes, bool]:
    """Status, body, and whether the body came whole, as a client sees them."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.netloc, timeout=ANSWER_WITHIN)
    try:
        connection.request("GET", f"{parts.path}?{parts.query}")
        response = connection.getresponse()
        try:
            return response.status, response.read(), True
        except (http.client.IncompleteRead, ConnectionError) as e:
            partial = getattr(e, "partial", b"")
            return response.status, partial, False
    finally:
        connection.close()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("mode", ["partial", "trickle", "huge"])
def test_a_lying_peer_never_gets_wrong_bytes_to_a_client(
    mirror_cluster: MirrorCluster, mode: str
) -> None:
    """The liar advertises a piece of ``other``, which nobody else holds, and of
    ``small``, which A holds."""
    cluster = mirror_cluster
    a, b, small, other = cluster.a, cluster.b, cluster.small, cluster.other
    if cluster.upstream.process is None:
        cluster.upstream.start()
    for node in cluster.nodes.values():
        cluster.ensure_running(node)
        start_without(node, other)
    start_holding(cluster, a, small)
    start_without(b, small)
    if mode == "huge":
        lone, shared = other.manifest_digest, small.manifest_digest
        lone_url = cluster.manifest_url(b, other, lone)
        shared_url = cluster.manifest_url(b, small, shared)
    else:
        lone, shared = other.layer_digests[0], small.layer_digests[0]
        lone_url, shared_url = cluster.blob_url(b, other, lone), cluster.blob_url(b, small, shared)

    with hostile_peer(cluster, mode, [lone, shared]) as liar:
        poll(lambda: liar.address in b.lookup(lone) and liar.address in b.lookup(shared), 10)
        started = time.monotonic()
        alone = fetch(lone_url)
        alone_seconds = time.monotonic() - started
        asked = len(liar.requests())
        honest = [fetch(shared_url) for _ in range(3)]

    print(
        f"{mode}: liar alone: {alone[0]}, {len(alone[1])} bytes, whole={alone[2]}, "
        f"{alone_seconds:.1f}s; with A: {[(s, len(body), whole) for s, body, whole in honest]}"
    )
    assert asked >= 1, "the liar was never asked: the test proves nothing"
    status, body, whole = alone
    assert status == 404 or not whole, f"a whole body from the liar reached the client ({status})"
    assert alone_seconds < ANSWER_WITHIN
    for status, body, whole in honest:
        assert (status, whole, digest_of(body)) == (200, True, shared)


def test_a_peer_that_names_another_image_for_a_tag_cannot_substitute_it(
    mirror_cluster: MirrorCluster,
) -> None:
    """The liar answers the tag of ``small`` with ``other``'s index; A holds the real one.
    B's containerd must end up with ``small``'s own index."""
    cluster = mirror_cluster
    a, b, small, other = cluster.a, cluster.b, cluster.small, cluster.other
    if cluster.upstream.process is None:
        cluster.upstream.start()
    start_holding(cluster, a, small)
    start_without(b, small)
    forged = cluster.base / "forged-index.json"
    forged.write_bytes(other.read_blob(other.index_digest))
    with hostile_peer(
        cluster,
        "tag",
        [small.name],
        "--tag-digest",
        other.index_digest,
        "--tag-file",
        str(forged),
    ) as liar:
        wait_until_listed(b, [small.name], [a])
        poll(lambda: liar.address in b.lookup(small.name), 10)
        b.pull(small.name)
        asked = liar.requests()

    assert asked, "the liar was never asked"
    assert b.image_digest(small.name) == small.index_digest


def test_a_blob_longer_than_its_manifest_says_never_starts(mirror_cluster: MirrorCluster) -> None:
    """The liar serves ``other``'s manifest honestly by digest, then a layer of it with a
    Content-Length 1 MiB too long. B, having checked the manifest, knows the layer's
    size: the liar is refused before a byte moves, and B answers 404 (nobody else holds
    ``other``), so containerd would go to the registry."""
    cluster = mirror_cluster
    b, other = cluster.b, cluster.other
    if cluster.upstream.process is None:
        cluster.upstream.start()
    for node in cluster.nodes.values():
        cluster.ensure_running(node)
        start_without(node, other)
    layer = other.layer_digests[0]
    manifest = cluster.base / "other-manifest.json"
    manifest.write_bytes(other.read_blob(other.manifest_digest))
    with hostile_peer(
        cluster,
        "long",
        [other.manifest_digest, layer],
        "--tag-digest",
        other.manifest_digest,
        "--tag-file",
        str(manifest),
        "--blob-size",
        str(other.size(layer)),
    ) as liar:
        poll(lambda: liar.address in b.lookup(layer), 10)
        checked = fetch(cluster.manifest_url(b, other, other.manifest_digest))
        refused = fetch(cluster.blob_url(b, other, layer))
        asked = liar.requests()

    assert checked[0] == 200 and digest_of(checked[1]) == other.manifest_digest
    assert any("/blobs/" in line for line in asked), asked
    assert refused[0] == 404, f"{refused[0]}, {len(refused[1])} bytes: the liar's body started"
