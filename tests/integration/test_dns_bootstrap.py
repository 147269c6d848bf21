"""The DNS bootstrap the Helm chart uses by default (``bootstrap-kind: dns``, a headless
Service's name), end to end: a real DNS server (``twistd dns``, Twisted Names, with a
zone naming two nodes' addresses), two ``twistd -n spegel`` nodes that know nothing of
each other but that name, and a blob one of them holds, pulled through the other.

Nodes ask resolv.conf's servers, which cannot be given a port; the test points them at
its own server with SPEGEL_TX_DNS_SERVER (``spegel_tx/service.py``).
"""

from __future__ import annotations

import hashlib
import socket
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.names import dns

from tests.integration.test_hostile_peers import fetch
from tests.support.loopback import loopback_host
from tests.support.processes import free_ports, log_tail, poll, start_process, stop_process

pytestmark = pytest.mark.integration

NAME = "spegel-tx-bootstrap.spegel-tx.svc.cluster.local"
ZONE = """\
zone = [
    SOA("cluster.local", mname="ns.cluster.local", rname="root.cluster.local", serial=1,
        refresh=60, retry=60, expire=60, minimum=1),
{records}]
"""


def port_free_at_all(hosts: list[str]) -> int:
    """One port free for TCP and UDP at every host: a DNS-named peer is reached at the
    node's own router port, so every node of a cluster listens on the same one."""
    for _ in range(50):
        port = free_ports(hosts[0], 1)[0]
        try:
            for host in hosts[1:]:
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as probe:
                        probe.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no port free at all of {hosts}")


def answers(server: tuple[str, int], name: str) -> list[str]:
    """The A records ``server`` gives for ``name`` (empty if it does not answer yet)."""
    query = dns.Message(id=7, recDes=True)
    query.addQuery(name.encode(), dns.A)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(1)
        udp.sendto(query.toStr(), server)
        try:
            data = udp.recv(4096)
        except TimeoutError:
            return []
    reply = dns.Message()
    reply.fromStr(data)
    return sorted(answer.payload.dottedQuad() for answer in reply.answers)


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[Any]:
    """Start with ``dns_server(addresses)``: ``twistd dns`` answering NAME with them."""
    processes = []

    def start(addresses: list[str]) -> tuple[str, int]:
        host = loopback_host()
        port = free_ports(host, 1)[0]
        zone = tmp_path / "cluster.zone.py"
        zone.write_text(
            ZONE.format(records="".join(f"    A({NAME!r}, {a!r}),\n" for a in addresses))
        )
        log_path = tmp_path / "dns.log"
        twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
        args = ["-n", "--pidfile=", "dns", "-i", host, "-p", str(port), "--pyzone", str(zone)]
        processes.append(start_process([*twistd, *args], log_path, cwd=tmp_path))
        ready = poll(lambda: answers((host, port), NAME) == sorted(addresses), 30)
        assert ready, f"the DNS server does not answer:\n{log_tail(log_path)}"
        return host, port

    yield start
    for process in processes:
        stop_process(process)


def test_nodes_that_know_only_a_dns_name_find_each_other_and_forward(
    spegel_node: Any,
    containerd: Any,
    demo_image: Any,
    dns_server: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hosts = [loopback_host(), loopback_host()]
    router_port = port_free_at_all(hosts)
    server_host, server_port = dns_server(hosts)
    monkeypatch.setenv("SPEGEL_TX_DNS_SERVER", f"{server_host}:{server_port}")
    keys = {"bootstrap_kind": "dns", "dns_bootstrap_domain": NAME, "wait_ready": False}
    a = spegel_node(containerd, host=hosts[0], router_addr=f"{hosts[0]}:{router_port}", **keys)
    b = spegel_node(
        containerd,
        host=hosts[1],
        router_addr=f"{hosts[1]}:{router_port}",
        containerd_namespace="holds-nothing",
        **keys,
    )

    def ready(node: Any) -> bool:
        try:
            with urllib.request.urlopen(f"{node.url}/readyz", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    # Ready means containerd answers and the DHT knows a peer: here, only through DNS.
    assert poll(lambda: ready(a) and ready(b), 30), (log_tail(a.log_path), log_tail(b.log_path))
    layer = demo_image.layer_digests[0]
    url = f"{b.url}/v2/{demo_image.repository}/blobs/{layer}?ns=registry.test"

    def served() -> tuple[int, bytes, bool] | None:
        answer = fetch(url)
        return answer if answer[0] == 200 else None

    answer = poll(served, 30)
    assert answer is not None, f"B never served A's layer:\n{log_tail(b.log_path)}"
    _, body, whole = answer
    assert whole and "sha256:" + hashlib.sha256(body).hexdigest() == layer
