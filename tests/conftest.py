"""Session-wide real processes: one containerd, one synthetic image, spegel-tx nodes on demand."""

from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import provider

from tests.support.cluster import MirrorCluster, running_cluster
from tests.support.containerd import Containerd, running_containerd
from tests.support.loopback import loopback_host
from tests.support.ociimage import SyntheticImage, build_image
from tests.support.processes import start_spegel, stop_process, wait_for_http
from tests.support.registry import DockerRegistry

# Hypothesis's deadline is per example: 2 s holds for the hot-path properties (codec,
# ranges, references) on 2 slow cores with another copy of the suite running, and still
# fails an example that went quadratic. Generating examples is the machine's speed, not
# the code's, so the too_slow health check stays off.
settings.register_profile(
    "shared-machine", deadline=2000, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("shared-machine")

REQUIRE_REAL = "SPEGEL_TX_REQUIRE_REAL"
"""Set to 1 (tests/run.sh does, and so .ci/run), a skipped test fails the run: the tests
against real containerd, ctr, skopeo and docker-registry are the only proof against real
components, and a run where they skipped proves nothing about them."""


def require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"needs {', '.join(missing)} (apt-get install containerd skopeo docker-registry)"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under SPEGEL_TX_REQUIRE_REAL=1, a skip is a failure that says what was missing."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and _real_required():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_REAL}=1, and this test skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """The same for a module that skips whole (``pytest.importorskip`` at its top)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _real_required():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_REAL}=1, and this module skipped: {reason}"


def _real_required() -> bool:
    return os.environ.get(REQUIRE_REAL, "") not in ("", "0")


_UNHANDLED = "Unhandled error in Deferred:"


@pytest.fixture(autouse=True)
def no_unhandled_deferred_errors() -> Iterator[None]:
    """A Deferred garbage-collected with a failure nobody handled fails the test that
    left it: Twisted only logs it, so the error would otherwise pass unseen."""
    unhandled: list[str] = []
    following = False

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        nonlocal following
        if event.get("log_format") == _UNHANDLED:
            following = True
            unhandled.append(_UNHANDLED)
        elif following and "log_failure" in event:
            following = False
            unhandled.append(event["log_failure"].getTraceback())

    globalLogPublisher.addObserver(observe)
    try:
        yield
        gc.collect()
        # What outlived the test is frozen out of later collections: each test's
        # collection then walks only what was made since, not the whole session's heap.
        gc.freeze()
    finally:
        globalLogPublisher.removeObserver(observe)
    if unhandled:
        pytest.fail("\n".join(unhandled), pytrace=False)


@pytest.fixture(scope="session")
def demo_image(tmp_path_factory: pytest.TempPathFactory) -> SyntheticImage:
    return build_image(tmp_path_factory.mktemp("demo-image"))


@pytest.fixture(scope="session")
def containerd(
    tmp_path_factory: pytest.TempPathFactory, demo_image: SyntheticImage
) -> Iterator[Containerd]:
    """Debian's containerd on its own root, holding ``demo_image`` in ``k8s.io``."""
    require("containerd", "ctr")
    base = tmp_path_factory.mktemp("containerd")
    with running_containerd(base, demo_image.archive, demo_image.name) as instance:
        yield instance


@pytest.fixture(scope="session")
def docker_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerRegistry]:
    """An empty upstream registry at ``docker_registry.address`` (plain HTTP, no auth).

    Fill it with ``docker_registry.push(image)``; digests are preserved, so the
    pushed tag names the image's index, as the imported image in containerd does.
    """
    require("docker-registry", "skopeo")
    registry = DockerRegistry(tmp_path_factory.mktemp("docker-registry"))
    try:
        registry.start()
        yield registry
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def mirror_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MirrorCluster]:
    """Nodes A, B and C, each an empty private containerd with
    ``twistd -n spegel`` beside it, all bootstrapping the DHT from A (A also
    names B and C, to rejoin after a restart); their
    containerd pulls through their own node (hosts.toml from ``spegel-tx
    configuration``) and falls back to an upstream docker-registry holding a
    105 MiB image ``big`` and small ``other`` and ``small``; each process on a
    loopback address of its own (``loopback_host``).
    """
    require("containerd", "ctr", "docker-registry", "skopeo")
    with running_cluster(tmp_path_factory.mktemp("mirror-cluster")) as cluster:
        yield cluster


@dataclass
class Node:
    """A running ``twistd -n spegel`` process."""

    host: str
    process: Popen[bytes]
    log_path: Path
    config: dict[str, Any]

    @property
    def router_address(self) -> str:
        return self.config["router-addr"]

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config['metrics-addr']}"

    @property
    def address(self) -> str:
        return str(self.config["registry-addr"])

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def pid(self) -> int:
        return self.process.pid


@pytest.fixture
def spegel_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start nodes with ``spegel_node(containerd, **extra_keys)``, each on a loopback
    address of its own (or on ``host=``); it returns once ``/readyz`` (or with
    ``wait_ready=False``, ``/livez``) answers.

    Runs the working tree's code (PYTHONPATH), logs JSON lines to a file, and
    stops every node by PID when the test ends.
    """
    nodes: list[Node] = []

    def start(
        containerd: Containerd, host: str | None = None, wait_ready: bool = True, **extra: Any
    ) -> Node:
        host = host or loopback_host()
        keys = containerd.node_keys(host) | {
            key.replace("_", "-"): value for key, value in extra.items()
        }
        workdir = tmp_path / f"node-{keys['registry-addr']}"
        process, log_path = start_spegel(keys, workdir)
        node = Node(host, process, log_path, keys)
        nodes.append(node)
        wait_for_http(f"{node.url}/{'readyz' if wait_ready else 'livez'}", process, log_path, 30)
        return node

    yield start
    for node in nodes:
        stop_process(node.process)
