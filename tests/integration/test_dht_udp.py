"""The DHT over real UDP: five `twistd -n spegel` processes, each on a loopback address of its
own, find each other's keys."""

import json
import urllib.request

import pytest

from tests.support.processes import poll

pytestmark = pytest.mark.integration


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_five_nodes_find_each_others_keys(spegel_node, containerd, demo_image):
    first = spegel_node(containerd, wait_ready=False)
    peers = first.router_address
    nodes = [first] + [
        spegel_node(containerd, wait_ready=False, static_bootstrap_peers=peers) for _ in range(4)
    ]
    for node in nodes:
        assert poll(
            lambda node=node: len(get_json(f"{node.metrics_url}/debug/peers")["peers"]) >= 4
        )

    everyone = {(node.host, node.port) for node in nodes}
    for key in (demo_image.name, demo_image.layer_digests[0]):
        for node in nodes:
            url = f"{node.metrics_url}/debug/lookup?key={key}"

            def providers(url=url):
                found = {(p["host"], p["registry_port"]) for p in get_json(url)["providers"]}
                return found if len(found) == 4 else None

            assert poll(providers) == everyone - {(node.host, node.port)}, (node.host, key)
    answer = get_json(f"{nodes[2].metrics_url}/debug/lookup?key=sha256:{'0' * 64}")
    assert answer["providers"] == []
    assert answer["elapsed_ms"] < 1000
