"""Clients that read slowly through a forwarding node, then leave: what they held is
given back, and each is logged as not completed."""

from __future__ import annotations

import socket
import time
import urllib.parse

import pytest

from tests.support.cluster import (
    MiB,
    MirrorCluster,
    poll,
    start_holding,
    start_without,
    wait_until_listed,
)
from tests.support.processes import rss

pytestmark = pytest.mark.integration

READERS = 100
GIVEN_BACK_WITHIN = 64 * MiB
"""RSS after the readers left may exceed RSS before them by at most this."""


def test_memory_held_for_slow_readers_is_given_back_when_they_leave(
    mirror_cluster: MirrorCluster,
) -> None:
    cluster = mirror_cluster
    a, b, big = cluster.a, cluster.b, cluster.big
    if cluster.upstream.process is None:
        cluster.upstream.start()
    cluster.ensure_running(b)
    start_holding(cluster, a, big)
    start_without(b, big)
    layer = max(big.layer_digests, key=big.size)
    wait_until_listed(b, [layer], [a])
    parts = urllib.parse.urlsplit(cluster.blob_url(b, big, layer))
    assert b.pid is not None
    since = b.log_offset()
    before = rss(b.pid)
    readers = []
    try:
        for _ in range(READERS):
            reader = socket.create_connection((b.host, b.port), timeout=30)
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            reader.sendall(f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
            assert reader.recv(65536).startswith(b"HTTP/1.1 200")
            readers.append(reader)
        time.sleep(2)
        holding = rss(b.pid)
    finally:
        for reader in readers:
            reader.close()

    def logged() -> list[dict]:
        lines = [r for r in b.access_log(since) if layer in r["path"]]
        return lines if len(lines) >= READERS else []

    lines = poll(logged, 20)
    time.sleep(3)
    after = rss(b.pid)
    print(
        f"B's RSS: {before >> 20} MiB before, {holding >> 20} MiB with {READERS} slow "
        f"readers, {after >> 20} MiB after they left"
    )
    assert lines, f"not every reader was logged: {len(b.access_log(since))} lines"
    assert not any(line["completed"] for line in lines), "a reader that left was logged complete"
    assert after - before < GIVEN_BACK_WITHIN, (before, holding, after)
