"""The spegel-tx image, built by deploy/image/build.sh, run the way the chart's DaemonSet runs it.

A ``PodNode`` is one Kubernetes node: its own containerd (Debian's, with runc) and the
pods the chart renders for it, started with ``ctr run`` from the rendered manifest:
the containers' command and arguments (``$(VAR)`` expanded from their environment, as
the kubelet does), environment (``status.hostIP`` is the node's address), securityContext
(user, capabilities, no new privileges, read-only root; applied by tests/support/
runc_security.py, since ctr cannot set a user), memory limit and volume mounts. Host
paths become the test containerd's paths; the chart's hostPort becomes host networking
on a loopback address of the node's own, as there is no CNI here.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy.render import render, split_documents
from tests.support.containerd import Containerd
from tests.support.loopback import loopback_host
from tests.support.processes import ROOT, free_ports, log_tail, poll
from tests.support.registry import skopeo_copy
from tests.support.runc_security import ANNOTATION

BUILD_SCRIPT = ROOT / "deploy" / "image" / "build.sh"
ARCHIVE_ENV = "SPEGEL_TX_IMAGE_ARCHIVE"
"""A built archive to test instead of building one (to iterate on the tests only)."""
QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi|K|M|G)?$")
QUANTITY_UNITS = {
    None: 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
}
VARIABLE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
STOP_GRACE = 10.0


# The built image


@dataclass(frozen=True)
class BuiltImage:
    archive: Path
    layout: Path
    seconds: float | None
    """How long build.sh took; None for an archive given in SPEGEL_TX_IMAGE_ARCHIVE."""

    def index(self) -> dict[str, Any]:
        return json.loads((self.layout / "index.json").read_text())

    @property
    def reference(self) -> str:
        """The name ``ctr images import`` gives it: ``docker.io/library/spegel-tx:0.1.0``."""
        (entry,) = self.index()["manifests"]
        return str(entry["annotations"]["io.containerd.image.name"])

    @property
    def tag(self) -> str:
        (entry,) = self.index()["manifests"]
        return str(entry["annotations"]["org.opencontainers.image.ref.name"])

    @property
    def manifest_digest(self) -> str:
        (entry,) = self.index()["manifests"]
        return str(entry["digest"])

    def blob(self, digest: str) -> bytes:
        return (self.layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.blob(self.manifest_digest))

    def config(self) -> dict[str, Any]:
        return json.loads(self.blob(self.manifest()["config"]["digest"]))

    def digests(self) -> list[str]:
        manifest = self.manifest()
        layers = [layer["digest"] for layer in manifest["layers"]]
        return [self.manifest_digest, manifest["config"]["digest"], *layers]

    def files(self) -> dict[str, tarfile.TarInfo]:
        """Every path of the image's file system (upper layers win), without a leading /."""
        entries: dict[str, tarfile.TarInfo] = {}
        for layer in self.manifest()["layers"]:
            path = self.layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
            with tarfile.open(path, "r:gz") as tar:
                for member in tar:
                    entries[member.name.removeprefix("./")] = member
        return entries

    def push(self, destination: str) -> None:
        """``skopeo copy`` to ``destination`` (``docker://host:port/repo:tag``), digests kept."""
        skopeo_copy(f"oci-archive:{self.archive}:{self.tag}", destination)


def build_image(directory: Path) -> BuiltImage:
    """``bash deploy/image/build.sh`` into ``directory``, as the README says to run it."""
    layout = directory / "layout"
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--output", str(directory), "--keep-layout", str(layout)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    seconds = time.monotonic() - started
    (directory / "build.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"build.sh failed:\n{(result.stdout + result.stderr)[-4000:]}")
    (archive,) = directory.glob("spegel-tx-*.tar")
    return BuiltImage(archive, layout, seconds)


def given_image(archive: Path, directory: Path) -> BuiltImage:
    layout = directory / "layout"
    with tarfile.open(archive) as tar:
        tar.extractall(layout, filter="data")
    return BuiltImage(archive, layout, None)


# Small pieces of Kubernetes


TEST_CLUSTER_SECRET = secrets.token_hex(24)
"""What the chart's generated router Secret holds, for every node of this test run."""


def quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity (``256Mi``) in bytes."""
    match = QUANTITY.match(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a memory quantity this test reads")
    return int(match.group(1)) * QUANTITY_UNITS[match.group(2)]


def expand(text: str, environment: Mapping[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion of a command or argument (``$$`` is a ``$``)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return environment.get(name, match.group(0))

    return VARIABLE.sub(replace, text)


@dataclass(frozen=True)
class Rendered:
    """The chart rendered for one node's values."""

    documents: tuple[dict[str, Any], ...]

    def find(self, kind: str, name: str) -> dict[str, Any]:
        for document in self.documents:
            if document["kind"] == kind and document["metadata"]["name"] == name:
                return document
        raise KeyError(f"no {kind} {name} in the rendered chart")

    @property
    def daemonset(self) -> dict[str, Any]:
        return self.find("DaemonSet", "spegel-tx")

    @property
    def cleanup(self) -> dict[str, Any]:
        return self.find("DaemonSet", "spegel-tx-cleanup")

    @property
    def node_yaml(self) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load(
            self.find("ConfigMap", "spegel-tx")["data"]["node.yaml"]
        )
        return data


def render_chart(values: Mapping[str, Any]) -> Rendered:
    rendered = render(dict(values))
    return Rendered(
        tuple(
            yaml.safe_load(document)
            for _, text in sorted(rendered.items())
            for document in split_documents(text)
        )
    )


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Mapping[str, Any], name: str) -> dict[str, Any]:
    spec = pod_spec(workload)
    for entry in spec.get("initContainers", []) + spec["containers"]:
        if entry["name"] == name:
            return dict(entry)
    raise KeyError(f"no container {name} in {workload['metadata']['name']}")


# A node: containerd and the chart's pods


@dataclass
class Running:
    """A container started detached; its output goes to ``log_path``."""

    id: str
    log_path: Path
    node: PodNode

    @property
    def pid(self) -> int:
        """The container's first process, as the host sees it."""
        for line in self.node.containerd.ctr("tasks", "ls").splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == self.id:
                return int(fields[1])
        raise RuntimeError(f"{self.id} has no task")

    def running(self) -> bool:
        for line in self.node.containerd.ctr("tasks", "ls").splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == self.id:
                return fields[2] == "RUNNING"
        return False

    def rss(self) -> tuple[int, int]:
        """Resident memory now and at its peak (VmRSS, VmHWM), in bytes."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return (
            int(values["VmRSS"].split()[0]) * 1024,
            int(values["VmHWM"].split()[0]) * 1024,
        )

    def log(self) -> str:
        return log_tail(self.log_path, 60)

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records


@dataclass
class PodNode:
    """One Kubernetes node of the test: a containerd able to run containers, on ``host``."""

    name: str
    host: str
    base: Path
    containerd: Containerd = field(init=False)
    registry_port: int = field(init=False)
    router_port: int = field(init=False)
    metrics_port: int = field(init=False)
    containers: list[Running] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.containerd = Containerd(self.base / "containerd")
        self.registry_port, self.router_port, self.metrics_port = free_ports(self.host, 3)
        self.runc = self._runc_shim()

    def __repr__(self) -> str:
        return f"<node {self.name} {self.host}>"

    @property
    def registry_url(self) -> str:
        return f"http://{self.host}:{self.registry_port}"

    @property
    def registry_address(self) -> str:
        return f"{self.host}:{self.registry_port}"

    @property
    def router_address(self) -> str:
        return f"{self.host}:{self.router_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"

    def _runc_shim(self) -> Path:
        """runc_security.py behind a shell line: the shim execs it as its runc."""
        shim = self.base / "runc"
        self.base.mkdir(parents=True, exist_ok=True)
        script = Path(__file__).with_name("runc_security.py")
        runc = shutil.which("runc") or "/usr/sbin/runc"
        shim.write_text(f'#!/bin/sh\nREAL_RUNC={runc} exec {sys.executable} {script} "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
        return shim

    def ctr_command(self, *args: str) -> list[str]:
        return ["ctr", "--address", self.containerd.address, "-n", self.containerd.namespace, *args]

    def values(self, image: str, **spegel: Any) -> dict[str, Any]:
        """The chart's values for this node: its image, its ports (each node of the test
        has its own, as they share one host), no NodePort fallback (no kube-proxy here)."""
        repository, _, tag = image.rpartition(":")
        return {
            "image": {"repository": repository, "tag": tag},
            "service": {
                "registry": {
                    "port": self.registry_port,
                    "hostPort": self.registry_port,
                    "nodePort": 0,
                },
                "router": {"port": self.router_port},
                "metrics": {"port": self.metrics_port},
            },
            "spegel": spegel,
        }

    def host_paths(self) -> dict[str, Path]:
        """The chart's host paths (its defaults) and where this node keeps them."""
        return {
            "/run/containerd/containerd.sock": Path(self.containerd.address),
            "/var/lib/containerd/io.containerd.content.v1.content": Path(
                self.containerd.content_path
            ),
            "/etc/containerd/certs.d": self.containerd.certs_dir,
            "/var/lib/spegel-tx": self.state_dir,
        }

    @property
    def state_dir(self) -> Path:
        """The node's DHT identity, kept across pod restarts as the chart keeps it."""
        path = self.base / "var-lib-spegel-tx"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def node_yaml(self, rendered: Rendered, bootstrap_peers: Sequence[str]) -> dict[str, Any]:
        """The ConfigMap's node.yaml, with the listen addresses on this node's loopback
        address (the chart listens on every interface) and static bootstrap peers (there
        is no cluster DNS for the headless Service)."""
        keys = rendered.node_yaml
        for key in ("registry-addr", "router-addr", "metrics-addr"):
            host, _, port = str(keys[key]).rpartition(":")
            assert host == "", f"the chart's {key} {keys[key]} names a host"
            keys[key] = f"{self.host}:{port}"
        assert keys.pop("bootstrap-kind") == "dns"
        keys.pop("dns-bootstrap-domain")
        keys["bootstrap-kind"] = "static"
        keys["static-bootstrap-peers"] = list(bootstrap_peers)
        return keys

    def volume_sources(self, workload: Mapping[str, Any], config: Mapping[str, Any] | None):
        """Volume name to the host directory or file behind it."""
        sources: dict[str, Path] = {}
        for volume in pod_spec(workload).get("volumes", []):
            name = volume["name"]
            if "hostPath" in volume:
                sources[name] = self.host_paths()[volume["hostPath"]["path"]]
            elif "configMap" in volume:
                directory = self.base / "configmap" / name
                directory.mkdir(parents=True, exist_ok=True)
                if config is not None:
                    (directory / "node.yaml").write_text(yaml.safe_dump(dict(config)))
                sources[name] = directory
            elif "emptyDir" in volume:
                directory = self.base / "emptydir" / f"{name}-{secrets.token_hex(3)}"
                directory.mkdir(parents=True)
                directory.chmod(0o777)  # as the kubelet makes an emptyDir
                sources[name] = directory
            else:
                raise AssertionError(f"volume {name}: a kind this test does not mount")
        return sources

    def ctr_run_options(
        self,
        workload: Mapping[str, Any],
        spec: Mapping[str, Any],
        config: Mapping[str, Any] | None,
        extra_mounts: Sequence[tuple[Path, str, bool]],
    ) -> tuple[list[str], dict[str, str]]:
        """ctr's flags for the rendered container ``spec``, and its environment."""
        environment = {}
        for entry in spec.get("env", []):
            if "value" in entry:
                environment[entry["name"]] = str(entry["value"])
            elif entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.hostIP":
                environment[entry["name"]] = self.host
            elif "secretKeyRef" in entry.get("valueFrom", {}):
                # The cluster secret the chart makes at install: the same on every node.
                environment[entry["name"]] = TEST_CLUSTER_SECRET
            else:
                raise AssertionError(f"env {entry['name']}: a source this test does not fill")
        contexts = {
            "securityContext": spec.get("securityContext", {}),
            "podSecurityContext": pod_spec(workload).get("securityContext", {}),
        }
        options = [
            "--net-host",
            f"--runc-binary={self.runc}",
            f"--runc-root={self.base / 'runc-state'}",
            f"--annotation={ANNOTATION}={json.dumps(contexts)}",
        ]
        if contexts["securityContext"].get("readOnlyRootFilesystem"):
            options.append("--read-only")
        limit = spec.get("resources", {}).get("limits", {}).get("memory")
        if limit:
            options.append(f"--memory-limit={quantity_bytes(limit)}")
        options += [f"--env={key}={value}" for key, value in environment.items()]
        sources = self.volume_sources(workload, config)
        mounts = [
            (sources[mount["name"]], mount["mountPath"], bool(mount.get("readOnly")))
            for mount in spec.get("volumeMounts", [])
        ] + list(extra_mounts)
        for source, destination, read_only in mounts:
            options.append(
                f"--mount=type=bind,src={source},dst={destination},"
                f"options=rbind:{'ro' if read_only else 'rw'}"
            )
        return options, environment

    def process_args(
        self,
        spec: Mapping[str, Any],
        environment: Mapping[str, str],
        image_entrypoint: Sequence[str],
    ) -> list[str]:
        """What the container runs: command and args replace the image's entrypoint and
        command; args alone follow the entrypoint (an empty list keeps the image's own)."""
        command = [expand(part, environment) for part in spec.get("command", [])]
        arguments = [expand(part, environment) for part in spec.get("args", [])]
        if command:
            return command + arguments
        if arguments:
            return list(image_entrypoint) + arguments
        return []

    def run(
        self,
        workload: Mapping[str, Any],
        name: str,
        image: str,
        image_entrypoint: Sequence[str],
        config: Mapping[str, Any] | None = None,
        detach: bool = True,
        extra_env: Mapping[str, str] | None = None,
        extra_mounts: Sequence[tuple[Path, str, bool]] = (),
        spec_changes: Mapping[str, Any] | None = None,
    ) -> Running | subprocess.CompletedProcess[str]:
        """Start the rendered container ``name`` of ``workload``; detached, it runs until
        ``stop``; otherwise this waits for it and returns its exit code and output."""
        spec = container(workload, name) | dict(spec_changes or {})
        options, environment = self.ctr_run_options(workload, spec, config, extra_mounts)
        options += [f"--env={key}={value}" for key, value in (extra_env or {}).items()]
        arguments = self.process_args(spec, environment, image_entrypoint)
        identifier = f"{self.name}-{name}-{secrets.token_hex(4)}"
        if not detach:
            return subprocess.run(
                self.ctr_command("run", "--rm", *options, image, identifier, *arguments),
                capture_output=True,
                text=True,
                timeout=120,
            )
        log_path = self.base / f"{identifier}.log"
        result = subprocess.run(
            self.ctr_command(
                "run",
                "--detach",
                f"--log-uri=file://{log_path}",
                *options,
                image,
                identifier,
                *arguments,
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"ctr run {identifier} failed: {result.stderr}")
        running = Running(identifier, log_path, self)
        self.containers.append(running)
        return running

    def stop(self, running: Running, grace: float = STOP_GRACE) -> None:
        """SIGTERM, SIGKILL after ``grace`` seconds as the kubelet does; then the task and
        the container (and its snapshot) go."""
        if running.running():
            self.containerd.ctr("tasks", "kill", "--signal", "SIGTERM", running.id)
            if not poll(lambda: not running.running(), timeout=grace):
                self.containerd.ctr("tasks", "kill", "--signal", "SIGKILL", running.id)
                poll(lambda: not running.running(), timeout=grace)
        self._remove(running.id)
        if running in self.containers:
            self.containers.remove(running)

    def _remove(self, identifier: str) -> None:
        for command in (["tasks", "delete", "--force"], ["containers", "delete"]):
            subprocess.run(self.ctr_command(*command, identifier), capture_output=True, timeout=60)

    def shutdown(self) -> None:
        """Every container, then containerd: a shim outlives a containerd stopped first.
        Containers left by a one-shot run that timed out go too."""
        for running in list(self.containers):
            self.stop(running)
        if self.containerd.process is not None:
            for identifier in self.containerd.ctr("containers", "ls", "-q").split():
                self._remove(identifier)
        self.containerd.stop()

    def pull(self, reference: str, namespace: str | None = None, timeout: float = 300) -> None:
        """What the kubelet's pull amounts to: containerd with this node's certs.d."""
        self.containerd.ctr(
            "images",
            "pull",
            "--hosts-dir",
            str(self.containerd.certs_dir),
            reference,
            namespace=namespace,
        )


@contextmanager
def pod_nodes(base: Path, names: Sequence[str]) -> Iterator[dict[str, PodNode]]:
    """Nodes with their containerd started, each on a loopback address of its own;
    every container and containerd is stopped on exit."""
    nodes = {name: PodNode(name, loopback_host(), base / name) for name in names}
    try:
        for node in nodes.values():
            node.containerd.start()
        yield nodes
    finally:
        for node in nodes.values():
            node.shutdown()


def wait_for_url(url: str, running: Running, timeout: float = 60.0, status: int = 200) -> None:
    """Until ``url`` answers ``status``; fails with the container's log if it stops or stalls."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not running.running():
            raise AssertionError(f"{running.id} stopped:\n{running.log()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                last = response.status
        except urllib.error.HTTPError as e:
            last = e.code
        except OSError:
            last = None
        if last == status:
            return
        time.sleep(0.1)
    raise AssertionError(
        f"{url} answered {last}, not {status}, within {timeout}s:\n{running.log()}"
    )
