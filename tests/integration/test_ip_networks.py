"""IPv6-only and dual-stack networks, for real: two nodes, each in a network namespace
of its own joined by a link (tests/support/netns.py), each a private containerd and
``twistd -n spegel`` configured as the chart configures a pod (``:5000``,
``:5001``, ``:9090``), bootstrapping from a name whose A and AAAA records (the
namespace's /etc/hosts) are the peers' addresses, and ``ctr``
pulling on one node what only the other holds: the image's registry does not exist,
so a pull that succeeds came from the peer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.support.containerd import Containerd
from tests.support.netns import Namespace, linked_pair
from tests.support.ociimage import SyntheticImage
from tests.support.processes import (
    poll,
    spegel_tx_cli,
    start_spegel,
    stop_process,
    wait_for_http,
)

REGISTRY = "https://registry.test"
BOOTSTRAP = "spegel-bootstrap.test"


@dataclass
class NetNode:
    namespace: Namespace
    containerd: Containerd
    process: subprocess.Popen[bytes]
    log_path: Path

    def get(self, url: str) -> tuple[int, bytes]:
        """GET ``url`` from inside this node's namespace."""

        def fetch() -> tuple[int, bytes]:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read()

        return self.namespace.call(fetch)

    def lookup(self, key: str) -> list[str]:
        """``host`` of every provider of ``key`` this node's DHT finds (/debug/lookup)."""
        query = urllib.parse.quote(key)
        _, body = self.get(f"http://[::1]:9090/debug/lookup?key={query}")
        return [provider["host"] for provider in json.loads(body)["providers"]]

    def pull(self, reference: str) -> subprocess.CompletedProcess[str]:
        certs = str(self.containerd.certs_dir)
        address, namespace = self.containerd.address, self.containerd.namespace
        return self.namespace.run(
            "ctr", "--address", address, "-n", namespace, "images", "pull",
            "--hosts-dir", certs, reference,
        )  # fmt: skip

    def access_log(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        return [r for r in records if r.get("namespace") == "spegel_tx.access"]


class Nodes:
    """Starts nodes in namespaces and stops every process by PID at the end."""

    def __init__(self, base: Path, stack: ExitStack) -> None:
        self.base = base
        self.stack = stack

    def start(self, namespace: Namespace, mirror_target: str, **keys: Any) -> NetNode:
        base = self.base / namespace.name[-1]  # a or b: socket paths stop at 104 bytes
        containerd = Containerd(base / "containerd", wrapper=namespace.wrapper)
        containerd.start()
        self.stack.callback(containerd.stop)
        configured = spegel_tx_cli(
            "configuration",
            "--containerd-registry-config-path", str(containerd.certs_dir),
            "--mirrored-registries", REGISTRY,
            "--mirror-targets", mirror_target,
        )  # fmt: skip
        assert configured.returncode == 0, configured.stderr
        node_keys = {
            "registry-addr": ":5000",
            "router-addr": ":5001",
            "metrics-addr": ":9090",
            "containerd-sock": containerd.address,
            "containerd-namespace": containerd.namespace,
            "containerd-content-path": containerd.content_path,
            "bootstrap-kind": "static",
            "static-bootstrap-peers": [f"{BOOTSTRAP}:5001"],
            "mirrored-registries": [REGISTRY],
            "data-dir": str(base / "data"),
        } | {key.replace("_", "-"): value for key, value in keys.items()}
        process, log_path = start_spegel(node_keys, base / "spegel", namespace.wrapper)
        self.stack.callback(stop_process, process)
        node = NetNode(namespace, containerd, process, log_path)
        namespace.call(
            lambda: wait_for_http(f"http://[{namespace.ipv6}]:5000/livez", process, log_path)
        )
        return node


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    require("containerd", "ctr")
    with ExitStack() as stack:
        yield Nodes(tmp_path, stack)


def wait_listed(asker: NetNode, image: SyntheticImage) -> list[str]:
    """Poll until ``asker`` finds a provider of the tag and of every layer; their hosts."""

    def listed() -> list[str]:
        found = [asker.lookup(key) for key in (image.name, *image.layer_digests)]
        return found[0] if all(found) else []

    hosts = poll(listed, 15)
    assert hosts, f"{image.name} never found: {asker.lookup(image.name)}"
    return hosts


def served_to(holder: NetNode, image: SyntheticImage) -> set[str]:
    """Clients ``holder`` sent the image's layers to, whole."""
    return {
        r["client"]
        for r in holder.access_log()
        if r["status"] == 200 and any(d in r["path"] for d in image.layer_digests)
    }


def test_ipv6_only_nodes_pull_from_each_other(nodes: Nodes, demo_image: SyntheticImage) -> None:
    with linked_pair(dual_stack=False, hosts={BOOTSTRAP: ["{a6}", "{b6}"]}) as (a, b):
        holder = nodes.start(a, f"http://{a.ipv6}:5000")
        holder.containerd.ctr("images", "import", str(demo_image.archive))
        # The node IP as the chart hands it over, $(NODE_IP) unbracketed: the
        # configuration command brackets it.
        puller = nodes.start(b, f"http://{b.ipv6}:5000")
        hosts_toml = (puller.containerd.certs_dir / "registry.test" / "hosts.toml").read_text()
        assert list(tomllib.loads(hosts_toml)["host"]) == [f"http://[{b.ipv6}]:5000"]
        b.call(
            lambda: wait_for_http(f"http://[{b.ipv6}]:5000/readyz", puller.process, puller.log_path)
        )
        assert wait_listed(puller, demo_image) == [a.ipv6]

        pulled = puller.pull(demo_image.name)

        assert pulled.returncode == 0, pulled.stderr
        digest = puller.containerd.ctr("images", "ls").split(demo_image.name)[1].split()[1]
        assert digest == demo_image.index_digest
        assert served_to(holder, demo_image) == {b.ipv6}


def test_dual_stack_node_is_reached_on_whichever_address_answers(
    nodes: Nodes, demo_image: SyntheticImage
) -> None:
    if shutil.which("iptables") is None or shutil.which("ip6tables") is None:
        pytest.skip("needs iptables and ip6tables (apt-get install iptables)")
    everyone = ["{a4}", "{a6}", "{b4}", "{b6}"]
    with linked_pair(dual_stack=True, hosts={BOOTSTRAP: everyone}) as (a, b):
        assert a.ipv4 is not None and b.ipv4 is not None
        holder = nodes.start(a, f"http://{a.ipv4}:5000")
        holder.containerd.ctr("images", "import", str(demo_image.archive))
        # An empty host: both stacks, on every address.
        for url in (f"http://{a.ipv4}:5000", f"http://[{a.ipv6}]:5000", "http://127.0.0.1:5000"):
            assert holder.get(f"{url}/livez")[0] == 200
        puller = nodes.start(b, f"http://{b.ipv4}:5000")
        assert puller.get(f"http://[{b.ipv6}]:9090/metrics")[0] == 200
        # The record names the holder at one of its addresses; its registry now
        # refuses connections on that one (a network policy that lets one family
        # through), so the puller must find it at the other.
        [recorded] = wait_listed(puller, demo_image)
        assert recorded in (a.ipv4, a.ipv6)
        tables = "ip6tables" if ":" in recorded else "iptables"
        refused = a.run(
            tables, "-A", "INPUT", "-p", "tcp", "--dport", "5000",
            "-j", "REJECT", "--reject-with", "tcp-reset",
        )  # fmt: skip
        assert refused.returncode == 0, refused.stderr

        pulled = puller.pull(demo_image.name)

        assert pulled.returncode == 0, pulled.stderr
        other = b.ipv4 if ":" in recorded else b.ipv6
        assert served_to(holder, demo_image) == {other}
