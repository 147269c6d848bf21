"""The built image, run as the chart's DaemonSet runs it on two nodes.

Each node is a private containerd (Debian's, with runc) on a loopback address of its
own; the containers are the rendered chart's (tests/support/image.py): the
``configuration`` init container, then the ``spegel-tx`` daemon, with their command,
arguments, environment, user, capabilities, read-only root, memory limit and mounts.

The story, in the fixture: an upstream docker-registry holds the spegel-tx image and
two small images. Node A pulls spegel-tx from it, runs the init container and the
daemon, and pulls the images through itself. The upstream stops. Node B, whose
containerd was given A as a mirror when it was set up (the bootstrap an operator
provisions), pulls spegel-tx from A, runs the chart's pods, and pulls an image through
its own spegel-tx from A. The tests then check what each step left, as an operator
would: containerd's images, the nodes' access logs, the probes, the doctor.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.support.image import (
    BuiltImage,
    PodNode,
    Rendered,
    Running,
    container,
    pod_nodes,
    quantity_bytes,
    render_chart,
    wait_for_url,
)
from tests.support.loopback import loopback_host
from tests.support.ociimage import SyntheticImage, build_image
from tests.support.processes import poll, spegel_tx_cli
from tests.support.registry import DockerRegistry

pytestmark = pytest.mark.integration

MiB = 1 << 20
CONCURRENT_PULLS = 8


@dataclass
class ImageCluster:
    image: BuiltImage
    upstream: DockerRegistry
    image_reference: str
    demo: SyntheticImage
    load: SyntheticImage
    a: PodNode
    b: PodNode
    renders: dict[str, Rendered] = field(default_factory=dict)
    daemons: dict[str, Running] = field(default_factory=dict)
    idle_rss: dict[str, int] = field(default_factory=dict)

    @property
    def entrypoint(self) -> list[str]:
        return list(self.image.config()["config"]["Entrypoint"])

    def values(self, node: PodNode) -> dict[str, Any]:
        return node.values(self.image_reference, mirroredRegistries=[self.upstream.url])

    def run_init(self, node: PodNode) -> subprocess.CompletedProcess[str]:
        result = node.run(
            self.renders[node.name].daemonset,
            "configuration",
            self.image_reference,
            self.entrypoint,
            detach=False,
        )
        assert isinstance(result, subprocess.CompletedProcess)
        assert result.returncode == 0, result.stderr + result.stdout
        return result

    def start_daemon(self, node: PodNode, peers: list[str]) -> Running:
        rendered = self.renders[node.name]
        running = node.run(
            rendered.daemonset,
            "spegel-tx",
            self.image_reference,
            self.entrypoint,
            config=node.node_yaml(rendered, peers),
        )
        assert isinstance(running, Running)
        self.daemons[node.name] = running
        return running

    def access(self, node: PodNode) -> list[dict[str, Any]]:
        return [
            record
            for record in self.daemons[node.name].log_records()
            if record.get("namespace") == "spegel_tx.access"
        ]


@pytest.fixture(scope="module")
def image_cluster(
    spegel_tx_image: BuiltImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ImageCluster]:
    require("containerd", "ctr", "runc", "docker-registry", "skopeo")
    base = tmp_path_factory.mktemp("image-cluster")
    upstream = DockerRegistry(base / "upstream", host=loopback_host(), log_level="info")
    try:
        upstream.start()
        reference = f"{upstream.address}/spegel-tx:{spegel_tx_image.tag}"
        spegel_tx_image.push(f"docker://{reference}")
        demo = build_image(
            base / "demo", f"{upstream.address}/library/demo:v1", (4 * MiB, 2 * MiB), seed=16
        )
        load = build_image(
            base / "load", f"{upstream.address}/library/load:v1", (32 * MiB, 16 * MiB), seed=17
        )
        for image in (demo, load):
            upstream.push(image)
        with pod_nodes(base, ["a", "b"]) as nodes:
            cluster = ImageCluster(
                spegel_tx_image, upstream, reference, demo, load, nodes["a"], nodes["b"]
            )
            bring_up(cluster)
            yield cluster
    finally:
        upstream.stop()


def bring_up(cluster: ImageCluster) -> None:
    a, b = cluster.a, cluster.b
    for node in (a, b):
        cluster.renders[node.name] = render_chart(cluster.values(node))

    # Node A, the first: the image comes straight from its registry (plain HTTP here).
    a.containerd.ctr("images", "pull", "--plain-http", cluster.image_reference)
    cluster.run_init(a)
    # Its peers, as the headless Service would list them (B's pod is not running yet).
    daemon_a = cluster.start_daemon(a, peers=[b.router_address])
    wait_for_url(f"{a.registry_url}/livez", daemon_a)
    for image in (cluster.demo, cluster.load):
        a.pull(image.name)
    cluster.upstream.stop()

    # Node B, set up with A's registry port as a mirror of the image's registry (what
    # the chart's NodePort fallback gives a node once its pods run), pulls the image
    # with the registry down.
    provisioned = spegel_tx_cli(
        "configuration",
        f"--containerd-registry-config-path={b.containerd.certs_dir}",
        f"--mirrored-registries={cluster.upstream.url}",
        "--mirror-targets",
        b.registry_url,
        a.registry_url,
    )
    assert provisioned.returncode == 0, provisioned.stderr
    b.pull(cluster.image_reference)
    cluster.run_init(b)
    daemon_b = cluster.start_daemon(b, peers=[a.router_address])
    for node in (a, b):
        wait_for_url(f"{node.registry_url}/readyz", cluster.daemons[node.name])
    for node in (a, b):
        cluster.idle_rss[node.name] = cluster.daemons[node.name].rss()[0]
    # What A advertised while alone reaches the DHT when A next joins (its bootstrap
    # retries back off to 30 s).
    assert poll(lambda: a.registry_address in lookup(b, cluster.demo.name), timeout=60)
    b.pull(cluster.demo.name)
    assert daemon_b.running()


def lookup(node: PodNode, key: str) -> list[str]:
    """``host:port`` of every provider of ``key`` the node's DHT finds (its debug page)."""
    url = f"{node.metrics_url}/debug/lookup?key={urllib.parse.quote(key)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        page = json.loads(response.read())
    return [f"{p['host']}:{p['registry_port']}" for p in page["providers"]]


def requested(record: dict[str, Any]) -> str:
    """The digest or tag an access log line's request named."""
    return str(record["path"]).split("?", 1)[0].rsplit("/", 1)[1]


def image_digest(node: PodNode, reference: str) -> str | None:
    for line in node.containerd.ctr("images", "ls").splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == reference:
            return fields[2]
    return None


def proc_status(running: Running) -> dict[str, str]:
    text = Path(f"/proc/{running.pid}/status").read_text()
    return {key: value.strip() for key, value in (line.split(":", 1) for line in text.splitlines())}


def test_a_node_pulls_the_spegel_tx_image_from_a_peer_while_its_registry_is_down(
    image_cluster: ImageCluster,
):
    cluster = image_cluster
    assert cluster.upstream.pid is None, "the upstream must be down for this pull"
    assert image_digest(cluster.b, cluster.image_reference) == cluster.image.manifest_digest
    served = {
        requested(record)
        for record in cluster.access(cluster.a)
        if record["status"] == 200
        and record["handler"] == "local"
        and "/spegel-tx/" in record["path"]
    }
    assert set(cluster.image.digests()) <= served, "A served the whole image to B"
    assert cluster.daemons["b"].running()


def test_two_nodes_serve_each_other_with_the_upstream_down(image_cluster: ImageCluster):
    cluster = image_cluster
    assert image_digest(cluster.b, cluster.demo.name) == cluster.demo.index_digest
    mirrored = {
        requested(record)
        for record in cluster.access(cluster.b)
        if record["handler"] == "mirror" and record["status"] == 200
    }
    assert set(cluster.demo.layer_digests) <= mirrored, "B forwarded every layer to A"


def test_probes_answer_on_the_registry_port(image_cluster: ImageCluster):
    """The chart's readiness and liveness probes: httpGet on the container's registry port."""
    cluster = image_cluster
    for node in (cluster.a, cluster.b):
        probes = {
            kind: container(cluster.renders[node.name].daemonset, "spegel-tx")[kind]["httpGet"]
            for kind in ("readinessProbe", "livenessProbe")
        }
        assert {probe["port"] for probe in probes.values()} == {"registry"}
        for probe in probes.values():
            with urllib.request.urlopen(f"{node.registry_url}{probe['path']}", timeout=5) as r:
                assert r.status == 200


def test_the_daemon_runs_as_the_chart_says(image_cluster: ImageCluster):
    """Root with no capability and no way to gain one, on a read-only root file system,
    with no write to Twisted's plugin cache attempted."""
    running = image_cluster.daemons["a"]
    status = proc_status(running)
    assert status["Uid"].split()[:2] == ["0", "0"]
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1"
    root = next(
        line.split()
        for line in Path(f"/proc/{running.pid}/mounts").read_text().splitlines()
        if line.split()[1] == "/"
    )
    assert "ro" in root[3].split(",")
    assert "Unable to write to plugin cache" not in running.log_path.read_text()


def test_the_doctor_passes_inside_the_image(image_cluster: ImageCluster):
    """``spegel-tx doctor`` in the daemon's container (its mounts, user and node.yaml),
    given the node's containerd config and certs.d as README says for a pod."""
    cluster = image_cluster
    node = cluster.b
    config_toml, certs = node.containerd.config, node.containerd.certs_dir
    result = node.run(
        cluster.renders["b"].daemonset,
        "spegel-tx",
        cluster.image_reference,
        cluster.entrypoint,
        config=node.node_yaml(cluster.renders["b"], [cluster.a.router_address]),
        detach=False,
        extra_mounts=[(config_toml, str(config_toml), True), (certs, str(certs), True)],
        spec_changes={
            "command": ["spegel-tx"],
            "args": [
                "doctor",
                "--config=/etc/spegel-tx/node.yaml",
                f"--containerd-config={config_toml}",
                f"--containerd-registry-config-path={certs}",
            ],
        },
    )
    assert isinstance(result, subprocess.CompletedProcess)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(lines) == 7 and all(line.startswith("ok") for line in lines), lines


def test_the_default_command_runs_from_environment_variables_alone(
    image_cluster: ImageCluster,
):
    """No command, no arguments, no node.yaml: Spegel's variables configure the daemon."""
    cluster = image_cluster
    node, host = cluster.b, loopback_host()
    running = node.run(
        cluster.renders["b"].daemonset,
        "spegel-tx",
        cluster.image_reference,
        cluster.entrypoint,
        spec_changes={"command": [], "args": []},
        extra_env={
            "REGISTRY_ADDR": f"{host}:{node.registry_port}",
            "ROUTER_ADDR": f"{host}:{node.router_port}",
            "METRICS_ADDR": f"{host}:{node.metrics_port}",
            "CONTAINERD_SOCK": "/run/containerd/containerd.sock",
            "CONTAINERD_NAMESPACE": "k8s.io",
            "BOOTSTRAP_KIND": "static",
            "STATIC_BOOTSTRAP_PEERS": cluster.a.router_address,
        },
    )
    assert isinstance(running, Running)
    try:
        wait_for_url(f"http://{host}:{node.registry_port}/readyz", running)
        manifest = f"http://{host}:{node.registry_port}/v2/library/demo/manifests/{cluster.demo.index_digest}"
        with urllib.request.urlopen(manifest, timeout=5) as response:
            assert response.status == 200
    finally:
        node.stop(running)


def test_the_images_own_user_cannot_open_the_containerd_socket(image_cluster: ImageCluster):
    """Why the chart runs as root: containerd's socket is root's, mode 0660."""
    cluster = image_cluster
    node, host = cluster.b, loopback_host()
    rendered = cluster.renders["b"]
    unprivileged = {
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    keys = node.node_yaml(rendered, [cluster.a.router_address])
    for key in ("registry-addr", "router-addr", "metrics-addr"):
        keys[key] = f"{host}:{keys[key].rsplit(':', 1)[1]}"
    keys["data-dir"] = ""  # the node's identity directory is root's too
    running = node.run(
        rendered.daemonset,
        "spegel-tx",
        cluster.image_reference,
        cluster.entrypoint,
        config=keys,
        spec_changes={"securityContext": unprivileged},
    )
    assert isinstance(running, Running)
    try:
        wait_for_url(f"http://{host}:{node.registry_port}/livez", running)
        assert proc_status(running)["Uid"].split()[0] == "10001"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://{host}:{node.registry_port}/readyz", timeout=5)
        assert refused.value.code == 503
    finally:
        node.stop(running)


def test_memory_idle_and_under_eight_concurrent_pulls(image_cluster: ImageCluster):
    """Both daemons stay under the chart's memory limit (it is their cgroup's limit here,
    so going over would kill them) while B pulls a 48 MiB image 8 times at once from A:
    A sends it from its content directory, B relays it. The peak is the kernel's
    high-water mark of the daemon's resident memory (VmHWM)."""
    cluster = image_cluster
    b = cluster.b
    limit = quantity_bytes(
        container(cluster.renders["a"].daemonset, "spegel-tx")["resources"]["limits"]["memory"]
    )
    pulls = [
        subprocess.Popen(
            [
                "ctr",
                "--address",
                b.containerd.address,
                "-n",
                f"pull-{index}",
                "images",
                "pull",
                "--hosts-dir",
                str(b.containerd.certs_dir),
                cluster.load.name,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(CONCURRENT_PULLS)
    ]
    try:
        errors = [pull.communicate(timeout=300)[1] for pull in pulls]
    finally:
        for pull in pulls:
            if pull.poll() is None:
                pull.kill()
                pull.wait()
    assert [pull.returncode for pull in pulls] == [0] * CONCURRENT_PULLS, errors
    figures = {}
    for name in ("a", "b"):
        assert cluster.daemons[name].running()
        peak = cluster.daemons[name].rss()[1]
        assert peak < limit
        figures[name] = {"idle_rss": cluster.idle_rss[name], "peak_rss": peak}
    print(f"\nspegel-tx container RSS, bytes (limit {limit}): {json.dumps(figures)}")
    mirrored = [
        record
        for record in cluster.access(b)
        if record["handler"] == "mirror" and cluster.load.layer_digests[0] in record["path"]
    ]
    assert len(mirrored) >= CONCURRENT_PULLS, "every pull's big layer went through B to A"


def test_cleanup_in_the_image_puts_certs_d_back(image_cluster: ImageCluster):
    """The post-delete hook's containers on node A: ``spegel-tx cleanup`` restores the
    certs.d the init container changed, and the ``done`` container then keeps running."""
    cluster = image_cluster
    node = cluster.a
    certs = node.containerd.certs_dir
    assert (certs / "_backup").is_dir()
    hook = cluster.renders["a"].cleanup
    result = node.run(hook, "cleanup", cluster.image_reference, cluster.entrypoint, detach=False)
    assert isinstance(result, subprocess.CompletedProcess)
    assert result.returncode == 0, result.stderr + result.stdout
    assert sorted(path.name for path in certs.iterdir()) == [], "A's certs.d was empty before"
    done = node.run(hook, "done", cluster.image_reference, cluster.entrypoint)
    assert isinstance(done, Running)
    try:
        assert not poll(lambda: not done.running(), timeout=2), done.log()
    finally:
        node.stop(done, grace=1)
