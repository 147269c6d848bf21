"""A three-node spegel-tx cluster on one machine, pulling through a real upstream registry.

Each node is what a Kubernetes node runs: a private containerd (its own root,
socket and ``certs.d``) and a ``twistd -n spegel`` beside it on a loopback
address of its own (``loopback_host``), with containerd's ``hosts.toml`` written by the real
``spegel-tx configuration``. Nodes pull with ``ctr images pull --hosts-dir``,
which sends what CRI sends (``?ns=``), so containerd asks its own spegel-tx
first and falls back to the upstream on a 404. Every process is stopped by
PID when the cluster stops.

Everything an assertion needs is read the way an operator reads it: the access
log lines of each node, ``/debug/lookup`` on its metrics address, ``ctr`` and
the upstream's own request log.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.containerd import Containerd
from tests.support.loopback import loopback_host
from tests.support.ociimage import SyntheticImage, build_image
from tests.support.processes import (
    free_ports,
    kill_process,
    log_tail,
    poll,
    spegel_tx_cli,
    start_spegel,
    stop_process,
    wait_for_http,
)
from tests.support.prometheus import Scrape, scrape
from tests.support.registry import DockerRegistry
from tests.support.throttle import Throttle

MiB = 1 << 20

NODE_NAMES = ("A", "B", "C")

BIG_LAYERS = (64 * MiB, 32 * MiB, 8 * MiB, 1 * MiB)
"""105 MiB in four layers; the 64 MiB one is long enough to kill a peer in the middle of it."""

ADVERTISE_WITHIN = 10.0
"""Seconds an advertisement or a withdrawal may take to show ("within seconds")."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    seconds: float


def http_get(url: str, timeout: float = 10.0) -> Response:
    """One GET on a fresh connection, timed from connect to the last byte of the body."""
    parts = urllib.parse.urlsplit(url)
    started = time.perf_counter()
    connection = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    return Response(response.status, body, time.perf_counter() - started)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


class SpegelNode:
    """One node: a private containerd and ``twistd -n spegel`` on ``host``.

    Ports are chosen once, so a restarted daemon comes back on the same
    addresses (and, with its ``data-dir``, the same DHT node id), as a
    restarted pod on the same node would.
    """

    def __init__(self, name: str, host: str, base: Path) -> None:
        self.name = name
        self.host = host
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.containerd = Containerd(base / "containerd")
        self.port, router_port, metrics_port = free_ports(host, 3)
        self.router_address = f"{host}:{router_port}"
        self.metrics_url = f"http://{host}:{metrics_port}"
        self.log_path = base / "spegel.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.keys: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<node {self.name} {self.address}>"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def certs_dir(self) -> Path:
        return self.containerd.certs_dir

    # The daemon

    def write_config(self, bootstrap_peers: list[str], mirrored_registries: list[str]) -> None:
        self.keys = {
            "registry-addr": self.address,
            "router-addr": self.router_address,
            "metrics-addr": self.metrics_url.removeprefix("http://"),
            "containerd-sock": self.containerd.address,
            "containerd-namespace": self.containerd.namespace,
            "containerd-content-path": self.containerd.content_path,
            "bootstrap-kind": "static",
            "static-bootstrap-peers": bootstrap_peers,
            "mirrored-registries": mirrored_registries,
            "data-dir": str(self.base / "data"),
            "debug-web-enabled": True,
        }

    def start(self) -> None:
        """Start the daemon and return once ``/livez`` answers."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self} is already running")
        self.process, _ = start_spegel(self.keys, self.base)
        wait_for_http(f"{self.url}/livez", self.process, self.log_path, 30)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """``/readyz`` answers 200: containerd answers and a DHT peer is known."""
        if self.process is None:
            raise RuntimeError(f"{self} is not running")
        wait_for_http(f"{self.url}/readyz", self.process, self.log_path, timeout)

    def kill(self) -> None:
        """SIGKILL by PID: no withdrawal, no goodbye, as when a node dies."""
        if self.process is not None:
            kill_process(self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # Its log: one JSON object per line

    def log_offset(self) -> int:
        """Where the log ends now; pass it as ``since`` to read only what comes after."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_records(self, since: int = 0) -> list[dict[str, Any]]:
        try:
            with self.log_path.open("rb") as f:
                f.seek(since)
                lines = f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # twistd's own plain lines, or a line cut by SIGKILL
            if isinstance(record, dict):
                records.append(record)
        return records

    def access_log(self, since: int = 0) -> list[dict[str, Any]]:
        """The ``spegel_tx.access`` lines: method, path, status, bytes, handler, completed..."""
        return [r for r in self.log_records(since) if r.get("namespace") == "spegel_tx.access"]

    def log_tail(self) -> str:
        return log_tail(self.log_path)

    # Its debug pages

    def lookup(self, key: str) -> list[str]:
        """``host:port`` of every provider this node's DHT finds for ``key``."""
        with urllib.request.urlopen(
            f"{self.metrics_url}/debug/lookup?key={urllib.parse.quote(key)}", timeout=10
        ) as response:
            page = json.loads(response.read())
        return [f"{p['host']}:{p['registry_port']}" for p in page["providers"]]

    def metrics(self) -> Scrape:
        """What Prometheus would scrape from the node's ``/metrics``."""
        return scrape(f"{self.metrics_url}/metrics")

    def peers(self) -> list[str]:
        with urllib.request.urlopen(f"{self.metrics_url}/debug/peers", timeout=10) as response:
            page = json.loads(response.read())
        return [f"{p['host']}:{p['port']}" for p in page["peers"]]

    # Its containerd

    def ctr_command(self, *args: str) -> list[str]:
        return ["ctr", "--address", self.containerd.address, "-n", self.containerd.namespace, *args]

    def pull_command(self, reference: str) -> list[str]:
        """What the kubelet's pull amounts to: containerd with this node's hosts.toml."""
        return self.ctr_command("images", "pull", "--hosts-dir", str(self.certs_dir), reference)

    def pull(self, reference: str, timeout: float = 120.0) -> float:
        """Pull ``reference`` as CRI would; returns the seconds it took."""
        started = time.monotonic()
        result = subprocess.run(
            self.pull_command(reference), capture_output=True, text=True, timeout=timeout
        )
        seconds = time.monotonic() - started
        if result.returncode != 0:
            raise PullFailed(self, reference, result.stderr.strip() or result.stdout.strip())
        return seconds

    def image_digest(self, reference: str) -> str | None:
        """The digest containerd's image ``reference`` points at, or None."""
        for line in self.containerd.ctr("images", "ls").splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == reference:
                return fields[2]
        return None

    def content(self) -> set[str]:
        """Every digest containerd's content store holds (``ctr content ls``)."""
        return {line.split()[0] for line in self.containerd.ctr("content", "ls").splitlines()[1:]}

    def blob_path(self, digest: str) -> Path:
        return Path(self.containerd.content_path, "blobs", *digest.split(":", 1))

    def remove_image(self, reference: str, digests: list[str]) -> None:
        """Delete the image (``digests``: all of its content) and make sure none stays behind.

        ``ctr images rm --sync`` waits for the garbage collector; leases (a pull
        that was cut off leaves one for 24 h) would pin content, so they go too,
        as do half-written ingests.
        """
        # CRI's plugin adds a second name, sha256:<config digest>, to every k8s.io image.
        names = {reference, *digests} & set(self.containerd.ctr("images", "ls", "-q").split())
        if names:
            self.containerd.ctr("images", "rm", "--sync", *sorted(names))
        for lease in self.containerd.ctr("leases", "ls", "-q").split():
            self.containerd.ctr("leases", "rm", lease)
        left = sorted(set(digests) & self.content())
        if left:
            self.containerd.ctr("content", "rm", *left)
        for ingest in self.ingests():
            # No pull runs now; ctr has no command to abort an ingest.
            shutil.rmtree(ingest.path, ignore_errors=True)
        still = set(digests) & self.content()
        if still:
            raise RuntimeError(f"{self}: content {sorted(still)} survived removing {reference}")

    def wait_for_ingest(
        self, digest: str, at_least: int, pull: subprocess.Popen[str], timeout: float
    ) -> int:
        """Poll every 2 ms until containerd has written ``at_least`` bytes of ``digest``
        in the running ``pull``; returns how many it had then."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ingest in self.ingests():
                if ingest.is_for(digest) and ingest.offset >= at_least:
                    return ingest.offset
            if pull.poll() is not None:
                raise AssertionError(f"{self}: the pull ended before {digest} was half way in")
            time.sleep(0.002)
        raise AssertionError(f"{self}: {digest} never reached {at_least} bytes in {timeout}s")

    def ingests(self) -> list[Ingest]:
        """Downloads in progress in containerd, read from its ingest directory.

        Faster than ``ctr content active`` (a few milliseconds per call), so a
        test can act while a blob is half way in.
        """
        found = []
        directory = Path(self.containerd.content_path, "ingest")
        try:
            entries = list(directory.iterdir())
        except FileNotFoundError:
            return []
        for entry in entries:
            try:
                ref = (entry / "ref").read_text()
                size = (entry / "data").stat().st_size
            except (FileNotFoundError, NotADirectoryError):
                continue
            found.append(Ingest(entry, ref, size))
        return found


@dataclass(frozen=True)
class Ingest:
    path: Path
    ref: str
    """containerd's ingest reference, e.g. ``layer-sha256:<hex>`` (with ctr's prefix)."""
    offset: int

    def is_for(self, digest: str) -> bool:
        return self.ref.endswith(digest)


class PullFailed(AssertionError):
    def __init__(self, node: SpegelNode, reference: str, output: str) -> None:
        super().__init__(f"{node} could not pull {reference}: {output}")
        self.node = node
        self.output = output


class MirrorCluster:
    """An upstream registry holding three images, and nodes A, B and C.

    The nodes start empty. ``big`` (105 MiB, four layers) is the image the
    scenarios move between nodes; ``other`` and ``small`` (a few MiB) are
    for pulls of an image no node holds yet.
    """

    def __init__(
        self,
        base: Path,
        node_names: tuple[str, ...] = NODE_NAMES,
        upstream_rate: float | None = None,
        node_keys: dict[str, Any] | None = None,
    ) -> None:
        """``upstream_rate``: the nodes reach the upstream through a ``Throttle`` sending
        that many bytes a second to all of them together, as over one uplink; the
        images are named after it. ``node_keys`` are added to each node's config."""
        self.base = base
        self.upstream = DockerRegistry(base / "upstream", log_level="info")
        self.throttle: Throttle | None = None
        self.upstream_url = self.upstream.url
        if upstream_rate is not None:
            self.throttle = Throttle(
                base / "throttle", loopback_host(), self.upstream.address, upstream_rate
            )
            self.upstream_url = f"http://{self.throttle.address}"
        self.node_keys = node_keys or {}
        images = base / "images"
        self.big = build_image(
            images / "big", self._name("library/big:v1"), layer_sizes=BIG_LAYERS, seed=1
        )
        self.other = build_image(
            images / "other", self._name("library/other:v1"), (MiB, 2 * MiB), seed=2
        )
        self.small = build_image(images / "small", self._name("library/small:v1"), (MiB,), seed=3)
        self.nodes = {name: SpegelNode(name, loopback_host(), base / name) for name in node_names}

    @property
    def registry_address(self) -> str:
        """The upstream as the nodes reach it: ``host:port`` in image names and ``ns``."""
        return self.upstream_url.removeprefix("http://")

    def _name(self, repository_and_tag: str) -> str:
        return f"{self.registry_address}/{repository_and_tag}"

    @property
    def a(self) -> SpegelNode:
        return self.nodes["A"]

    @property
    def b(self) -> SpegelNode:
        return self.nodes["B"]

    @property
    def c(self) -> SpegelNode:
        return self.nodes["C"]

    def start(self) -> None:
        self.upstream.start()
        if self.throttle is not None:
            self.throttle.start()
        for image in (self.big, self.other, self.small):
            self.upstream.push(image)
        for node in self.nodes.values():
            node.containerd.start()
            result = spegel_tx_cli(
                "configuration",
                "--containerd-registry-config-path",
                str(node.certs_dir),
                "--mirrored-registries",
                self.upstream_url,
                "--mirror-targets",
                node.url,
            )
            if result.returncode != 0:
                raise RuntimeError(f"spegel-tx configuration failed: {result.stderr}")
            node.write_config(self.bootstrap_peers(node), [self.upstream_url])
            node.keys.update(self.node_keys)
            node.start()
        for node in self.nodes.values():
            node.wait_ready()
        for node in self.nodes.values():
            if not poll(functools.partial(self._knows_everyone, node), 15):
                raise RuntimeError(f"{node} does not know every other node: {node.peers()}")

    def _knows_everyone(self, node: SpegelNode) -> bool:
        others = {n.router_address for n in self.nodes.values() if n is not node}
        return others <= set(node.peers())

    def bootstrap_peers(self, node: SpegelNode) -> list[str]:
        """Every node bootstraps from A's router address.

        A also names B and C: a node whose only bootstrap peer is itself, once
        restarted, stays alone until another node's periodic bootstrap pings
        it (every 60 s; 55 s measured here), and the scenarios restart A.
        """
        if node is self.a:
            return [n.router_address for n in self.nodes.values()]
        return [self.a.router_address]

    def stop(self) -> None:
        with ExitStack() as stack:
            # Every process is stopped even if one of the stops raises.
            stack.callback(self.upstream.stop)
            if self.throttle is not None:
                stack.callback(self.throttle.stop)
            for node in self.nodes.values():
                stack.callback(node.containerd.stop)
            for node in self.nodes.values():
                stack.callback(node.stop)

    # What the scenarios ask

    def blob_url(self, node: SpegelNode, image: SyntheticImage, digest: str) -> str:
        return f"{node.url}/v2/{image.repository}/blobs/{digest}?ns={self._ns()}"

    def manifest_url(self, node: SpegelNode, image: SyntheticImage, reference: str) -> str:
        return f"{node.url}/v2/{image.repository}/manifests/{reference}?ns={self._ns()}"

    def _ns(self) -> str:
        return urllib.parse.quote(self.registry_address, safe="")

    def ensure_holds(self, node: SpegelNode, image: SyntheticImage) -> None:
        """Make ``node`` hold ``image`` by whatever path works (its mirror or the upstream)."""
        if node.image_digest(image.name) == image.index_digest:
            return
        if self.upstream.process is None:
            self.upstream.start()
        node.pull(image.name)

    def ensure_running(self, node: SpegelNode) -> None:
        """A killed daemon comes back as a restarted pod would: same addresses, same
        node id; returns once it is ready and has advertised what its containerd holds."""
        if node.alive():
            return
        since = node.log_offset()
        node.start()
        node.wait_ready()
        if node.containerd.ctr("images", "ls", "-q").strip():
            advertised = poll(
                lambda: any("advertised" in r.get("msg", "") for r in node.log_records(since)),
                10,
            )
            if not advertised:
                raise RuntimeError(f"{node} did not advertise after a restart:\n{node.log_tail()}")


# Putting the cluster in a scenario's starting state


def keys_of(image: SyntheticImage) -> list[str]:
    """What a holder advertises: the tag, and every digest (index, manifest, config, layers)."""
    return [image.name, *image.digests]


def start_holding(cluster: MirrorCluster, node: SpegelNode, image: SyntheticImage) -> None:
    """``node`` runs, holds ``image`` and is found for it by the others."""
    cluster.ensure_running(node)
    cluster.ensure_holds(node, image)
    for other in cluster.nodes.values():
        if other is not node and other.alive():
            wait_until_listed(other, [image.name, image.layer_digests[0]], [node])


def start_without(node: SpegelNode, image: SyntheticImage) -> None:
    node.remove_image(image.name, image.digests)


def providers_of(node: SpegelNode, keys: list[str]) -> dict[str, set[str]]:
    return {key: set(node.lookup(key)) for key in keys}


def wait_until_listed(
    asker: SpegelNode, keys: list[str], holders: list[SpegelNode]
) -> dict[str, set[str]]:
    """Poll ``asker``'s /debug/lookup until every key lists every holder."""
    wanted = {holder.address for holder in holders}

    def listed() -> dict[str, set[str]] | None:
        found = providers_of(asker, keys)
        return found if all(wanted <= providers for providers in found.values()) else None

    found = poll(listed, ADVERTISE_WITHIN, 0.2)
    assert found, f"{asker} never found {wanted} for all of {keys}: {providers_of(asker, keys)}"
    return found


@contextmanager
def running_cluster(base: Path, **options: Any) -> Iterator[MirrorCluster]:
    """A started ``MirrorCluster(base, **options)``, stopped however the block ends."""
    cluster = MirrorCluster(base, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
