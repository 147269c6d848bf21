"""A node as its operator meets it: the real ``twistd spegel`` and ``spegel-tx registry``
processes, their exact startup and failure lines, their logs, and one readiness on
every page."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from spegel_tx import __version__
from tests.conftest import require
from tests.support.loopback import loopback_host
from tests.support.processes import (
    ROOT,
    free_ports,
    log_tail,
    poll,
    start_process,
    start_spegel,
    stop_process,
    wait_for_http,
)

pytestmark = pytest.mark.integration

HOST = loopback_host()
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
SPEGEL_TX = [sys.executable, "-m", "spegel_tx.cli"]
JSON_LOGS = ["--logger", "spegel_tx.logs.json_observer"]
CONTAINERD_DOWN = "containerd is not reachable"
NO_PEER = "no DHT peer found yet"


def environment(**extra: str) -> dict[str, str]:
    """The working tree's code, and none of the node's variables from the test's own."""
    kept = {
        key: value
        for key, value in os.environ.items()
        if not key.isupper() or key in ("PATH", "HOME", "LANG", "TMPDIR")
    }
    return {**kept, "PYTHONPATH": str(ROOT), **extra}


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=60, cwd=cwd, env=environment(**env)
    )


def addresses(tmp_path: Path) -> dict[str, str]:
    registry, router, metrics = free_ports(HOST, 3)
    return {
        "registry-addr": f"{HOST}:{registry}",
        "router-addr": f"{HOST}:{router}",
        "metrics-addr": f"{HOST}:{metrics}",
        "containerd-sock": str(tmp_path / "no-containerd.sock"),
    }


def node_yaml(tmp_path: Path, **keys: Any) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(addresses(tmp_path) | keys))
    return path


def one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed start printed, wherever it went."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = (result.stdout + result.stderr).splitlines()
    assert "Traceback" not in result.stdout + result.stderr
    assert len(lines) == 1, lines
    return lines[0]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def log_records(log_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


# --- one line for each startup failure ----------------------------------------------------------


@pytest.fixture
def held_port() -> Iterator[int]:
    """A TCP port on HOST that something else listens on."""
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_port_in_use_is_one_line_in_the_json_log(tmp_path: Path, held_port: int) -> None:
    config = node_yaml(tmp_path, **{"metrics-addr": f"{HOST}:{held_port}"})
    result = run([*TWISTD, "-n", "--pidfile=", *JSON_LOGS, "spegel", "-c", str(config)], tmp_path)
    [line] = [json.loads(one_line_failure(result))]
    assert line["msg"] == (
        f"spegel-tx: metrics-addr: {HOST}:{held_port} is already in use: stop what listens "
        "there, or set metrics-addr (METRICS_ADDR) to a free one"
    )


@pytest.mark.parametrize(
    ("keys", "env", "line"),
    [
        pytest.param(
            {},
            {"ROUTER_ADDR": "localhost"},
            "spegel-tx: router-addr: 'localhost' has no port; write host:port or :port "
            "(from ROUTER_ADDR)",
            id="bad environment value",
        ),
        pytest.param(
            {},
            {"ROUTER_SECRET": "too-short"},
            "spegel-tx: ROUTER_SECRET: holds 9 bytes, a cluster secret needs 16 or more: give "
            "every node the same longer one (`head -c 32 /dev/urandom | base64` makes one)",
            id="short ROUTER_SECRET",
        ),
        pytest.param(
            {"router-secret-file": "{tmp}/secret"},
            {},
            "spegel-tx: router-secret-file: {tmp}/secret holds 5 bytes, a cluster secret needs "
            "16 or more: put the same longer one on every node (`head -c 32 /dev/urandom | "
            "base64 > {tmp}/secret`)",
            id="short secret file",
        ),
        pytest.param(
            {"router-secret-file": "{tmp}"},
            {},
            "spegel-tx: router-secret-file: cannot read {tmp}: Is a directory: make it a file "
            "this user (uid {uid}) can read, or point router-secret-file at the cluster secret",
            id="unreadable secret file",
        ),
        pytest.param(
            {"data-dir": "{tmp}/secret/data"},
            {},
            "spegel-tx: data-dir: cannot keep the node id in {tmp}/secret/data: Not a "
            "directory: make it a directory this user (uid {uid}) can write, or leave data-dir "
            "empty",
            id="unusable data-dir",
        ),
    ],
)
def test_a_bad_start_is_one_line_on_stderr(
    tmp_path: Path, keys: dict[str, str], env: dict[str, str], line: str
) -> None:
    (tmp_path / "secret").write_text("short\n")
    values = {"tmp": str(tmp_path), "uid": str(os.getuid())}
    config = node_yaml(tmp_path, **{k: v.format(**values) for k, v in keys.items()})
    result = run(
        [*TWISTD, "-n", "--pidfile=", *JSON_LOGS, "spegel", "-c", str(config)], tmp_path, **env
    )
    assert result.stdout == ""
    assert one_line_failure(result) == line.format(**values)


def test_spegel_flags_we_cannot_honour_are_refused_by_name(tmp_path: Path) -> None:
    result = run([*SPEGEL_TX, "registry", "--http-bootstrap-url=http://10.0.0.2/id"], tmp_path)
    assert one_line_failure(result) == (
        "spegel-tx: --http-bootstrap-url: HTTP bootstrap is not supported: use bootstrap-kind "
        "dns or static (see --help)"
    )


def test_both_commands_print_our_version(tmp_path: Path) -> None:
    for args in ([*SPEGEL_TX, "version"], [*TWISTD, "spegel", "--version"]):
        result = run(args, tmp_path)
        assert (result.returncode, result.stdout) == (0, f"spegel-tx {__version__}\n"), args


# --- what a running node says -------------------------------------------------------------------


def test_spegel_tx_registry_runs_a_spegel_daemonset_command_line(tmp_path: Path) -> None:
    """The registry container's arguments from Spegel's chart, addresses made local."""
    keys = addresses(tmp_path)
    peer = f"{HOST}:{free_ports(HOST, 1)[0]}"
    args = [
        "registry",
        "--log-level=INFO",
        "--mirror-resolve-retries=3",
        "--mirror-resolve-timeout=20ms",
        f"--registry-addr={keys['registry-addr']}",
        f"--router-addr={keys['router-addr']}",
        f"--metrics-addr={keys['metrics-addr']}",
        "--mirrored-registries",
        "https://docker.io",
        "https://ghcr.io",
        f"--containerd-sock={keys['containerd-sock']}",
        "--containerd-namespace=k8s.io",
        "--bootstrap-kind=static",
        "--static-bootstrap-peers",
        peer,
        "--registry-filters",
        ":latest$",
        "--containerd-content-path=/var/lib/containerd/io.containerd.content.v1.content",
        "--debug-web-enabled=true",
        f"--data-dir={tmp_path / 'data'}",
        "--containerd-registry-config-path=/etc/containerd/certs.d",
    ]
    log_path = tmp_path / "registry.log"
    process = start_process([*SPEGEL_TX, *args], log_path, cwd=tmp_path, env=environment())
    try:
        wait_for_http(f"http://{keys['metrics-addr']}/debug/web/", process, log_path, 30)
        records = log_records(log_path)
    finally:
        stop_process(process)
    said = [(r["level"], r["msg"]) for r in records]
    assert said[:3] == [
        (
            "warn",
            "--containerd-registry-config-path ignored: only `spegel-tx configuration` and "
            "`spegel-tx doctor` read containerd's registry config",
        ),
        (
            "warn",
            "the DHT runs without a cluster secret (router-secret-file): anyone who can send "
            "this node a UDP datagram can join the DHT, advertise content under any digest or "
            "tag, and sit in lookups; set the same secret on every node",
        ),
        (
            "info",
            f"spegel-tx {__version__}: registry {keys['registry-addr']}, router "
            f"{keys['router-addr']} (UDP), metrics {keys['metrics-addr']}; containerd "
            f"{keys['containerd-sock']} namespace k8s.io; bootstrap static {peer}; forwards "
            "what it lacks to peers",
        ),
    ], log_tail(log_path)
    assert (tmp_path / "data" / "node-id").exists()


def test_the_log_says_what_the_node_is_and_nothing_of_twisted_internals(tmp_path: Path) -> None:
    """Logged at DEBUG, to see what is kept from INFO."""
    keys = addresses(tmp_path) | {"debug-web-enabled": True, "log-level": "DEBUG"}
    process, log_path = start_spegel(keys, tmp_path / "node")
    metrics = f"http://{keys['metrics-addr']}"

    def containerd_tries() -> list[dict[str, Any]]:
        return [r for r in log_records(log_path) if "not reachable" in r["msg"]]

    try:
        wait_for_http(f"http://{keys['registry-addr']}/livez", process, log_path, 30)
        for path in ("/metrics", "/debug/peers", "/debug/web/api/node"):
            assert get(metrics + path)[0] == 200, path
        assert len(poll(lambda: len(containerd_tries()) >= 3 and containerd_tries())) >= 3
        records = log_records(log_path)
    finally:
        stop_process(process)
    started = [r for r in records if r["namespace"] == "spegel_tx.service"]
    assert [r["msg"] for r in started] == [
        f"spegel-tx {__version__}: registry {keys['registry-addr']}, router "
        f"{keys['router-addr']} (UDP), metrics {keys['metrics-addr']}; containerd "
        f"{keys['containerd-sock']} namespace k8s.io; bootstrap static (no peers); never "
        "forwards: no bootstrap peers, so it serves only its own content"
    ]
    assert started[0]["containerd"] == keys["containerd-sock"]
    said = [r for r in records if r["level"] != "debug"]
    twisted = [r["msg"] for r in said if r["namespace"].startswith(("twisted", "log_legacy"))]
    assert twisted == [], "twistd's banner, ports starting and closing: debug, not info"
    assert not [r["msg"] for r in said if "object at 0x" in r["msg"] or "<twisted" in r["msg"]]
    down = [r for r in records if "not reachable" in r["msg"]]
    assert [r["level"] for r in down] == ["warn"] + ["debug"] * (len(down) - 1), (
        "once per outage, not per retry"
    )
    assert down[0]["msg"].endswith("Check containerd-sock, or run `spegel-tx doctor`.")
    access = {r["path"]: r for r in records if r["namespace"] == "spegel_tx.access"}
    assert {"/metrics", "/debug/peers", "/debug/web/api/node"} <= set(access)
    assert access["/metrics"]["status"] == 200 and access["/metrics"]["method"] == "GET"


# --- one readiness ------------------------------------------------------------------------------


def readiness_everywhere(registry: str, metrics: str) -> dict[str, tuple[bool, list[str]]]:
    code, body = get(f"http://{registry}/readyz")
    said = {"/readyz": (code == 200, [] if code == 200 else body.decode().splitlines())}
    for path in ("/debug/peers", "/debug/web/api/node"):
        page = json.loads(get(f"http://{metrics}{path}")[1])
        said[path] = (page["ready"], page["not_ready_because"])
    return said


def agreed(said: dict[str, tuple[bool, list[str]]]) -> tuple[bool, list[str]]:
    answers = list(said.values())
    assert answers == [answers[0]] * len(answers), said
    return answers[0]


def test_readiness_is_one_answer_without_containerd(tmp_path: Path) -> None:
    peer = f"{HOST}:{free_ports(HOST, 1)[0]}"
    keys = addresses(tmp_path) | {"debug-web-enabled": True, "static-bootstrap-peers": [peer]}
    process, log_path = start_spegel(keys, tmp_path / "node")
    try:
        wait_for_http(f"http://{keys['registry-addr']}/livez", process, log_path, 30)
        said = readiness_everywhere(keys["registry-addr"], keys["metrics-addr"])
    finally:
        stop_process(process)
    assert agreed(said) == (False, [CONTAINERD_DOWN, NO_PEER])


def test_readiness_is_one_answer_alone_and_with_peers_not_found(
    spegel_node: Any, containerd: Any
) -> None:
    require("containerd", "ctr")
    alone = spegel_node(containerd, debug_web_enabled=True)
    assert agreed(readiness_everywhere(alone.address, alone.config["metrics-addr"])) == (True, [])
    waiting = spegel_node(
        containerd,
        wait_ready=False,
        debug_web_enabled=True,
        static_bootstrap_peers=[f"{HOST}:{free_ports(HOST, 1)[0]}"],
    )
    poll(lambda: get(f"{waiting.url}/readyz")[1] == f"{NO_PEER}\n".encode(), timeout=30)
    said = readiness_everywhere(waiting.address, waiting.config["metrics-addr"])
    assert agreed(said) == (False, [NO_PEER])
