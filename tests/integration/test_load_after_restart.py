"""Right after a restart, under 50 concurrent clients, a node answers 404 for none of
the content its peers hold: a busy event loop must not make a lookup look idle."""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from collections import Counter

import pytest

from tests.support.cluster import MirrorCluster, start_holding, start_without

pytestmark = pytest.mark.integration

CLIENTS = 50
REQUESTS = 8000
SECONDS = 60.0


def test_fifty_clients_right_after_a_restart_get_no_false_404(
    mirror_cluster: MirrorCluster,
) -> None:
    cluster = mirror_cluster
    a, b, c, big = cluster.a, cluster.b, cluster.c, cluster.big
    if cluster.upstream.process is None:
        cluster.upstream.start()
    start_holding(cluster, a, big)
    start_holding(cluster, c, big)
    start_without(b, big)
    small = [big.config_digest, big.manifest_digest, big.index_digest]
    urls = [cluster.blob_url(b, big, big.config_digest)] + [
        cluster.manifest_url(b, big, digest) for digest in small[1:]
    ]
    b.stop()
    cluster.ensure_running(b)

    statuses: Counter[int] = Counter()
    missing: list[bytes] = []
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS

    def client(index: int) -> None:
        parts = [urllib.parse.urlsplit(url) for url in urls]
        connection = http.client.HTTPConnection(parts[0].netloc, timeout=30)
        sent = 0
        try:
            while time.monotonic() < deadline:
                with lock:
                    if sum(statuses.values()) >= REQUESTS:
                        return
                part = parts[(index + sent) % len(parts)]
                connection.request("GET", f"{part.path}?{part.query}")
                response = connection.getresponse()
                body = response.read()
                if response.status == 404 and len(missing) < 5:
                    missing.append(body[:300])
                sent += 1
                with lock:
                    statuses[response.status] += 1
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SECONDS + 30)
    print(f"{sum(statuses.values())} requests from {CLIENTS} clients: {dict(statuses)}")
    assert sum(statuses.values()) >= 1000
    assert statuses[404] == 0, (dict(statuses), missing)
    assert set(statuses) == {200}, dict(statuses)
