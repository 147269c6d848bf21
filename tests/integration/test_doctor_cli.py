"""`spegel-tx doctor` as an operator runs it, against real containerd processes (the session's,
configured right, and one with discard_unpacked_layers on and no config_path), hosts.toml
written by `spegel-tx configuration`, and two real spegel-tx nodes that found each other."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import require
from tests.support.containerd import Containerd
from tests.support.loopback import loopback_host
from tests.support.processes import (
    poll,
    spegel_tx_cli,
    start_spegel,
    stop_process,
    wait_for_http,
)

pytestmark = pytest.mark.integration

SECRET = "doctor-test-cluster-secret"
DISCARDING = """\
[plugins."io.containerd.grpc.v1.cri".containerd]
  discard_unpacked_layers = true
"""


def peer_count(keys: dict[str, object]) -> int:
    with urllib.request.urlopen(f"http://{keys['metrics-addr']}/debug/peers", timeout=2) as r:
        return len(json.load(r)["peers"])


@pytest.fixture(scope="module")
def node(containerd: Containerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Node A's node.yaml: A and B (B bootstraps from A) share a cluster secret, know each
    other and serve the session containerd, whose certs.d has the hosts.toml that
    `spegel-tx configuration` writes for A (restored by `cleanup` afterwards)."""
    base = tmp_path_factory.mktemp("doctor")
    secret_file = base / "router-secret"
    secret_file.write_text(SECRET)
    first = containerd.node_keys(loopback_host()) | {"router-secret-file": str(secret_file)}
    second = containerd.node_keys(loopback_host()) | {
        "router-secret-file": str(secret_file),
        "static-bootstrap-peers": [first["router-addr"]],
    }
    processes = []
    try:
        for keys in (first, second):
            process, log_path = start_spegel(keys, base / str(keys["registry-addr"]))
            processes.append(process)
            wait_for_http(f"http://{keys['registry-addr']}/readyz", process, log_path, 30)
        assert poll(lambda: peer_count(first) and peer_count(second), timeout=10)
        written = spegel_tx_cli(
            "configuration",
            f"--containerd-registry-config-path={containerd.certs_dir}",
            f"--mirror-targets=http://{first['registry-addr']}",
        )
        assert written.returncode == 0, written.stderr
        yield base / str(first["registry-addr"]) / "node.yaml"
    finally:
        spegel_tx_cli("cleanup", f"--containerd-registry-config-path={containerd.certs_dir}")
        for process in processes:
            stop_process(process)


def doctor(containerd: Containerd, node_yaml: Path, *args: str) -> tuple[int, list[str]]:
    """The doctor's exit code and lines, for ``containerd`` and the node of ``node_yaml``."""
    result = spegel_tx_cli(
        "doctor",
        f"--config={node_yaml}",
        f"--containerd-config={containerd.config}",
        f"--containerd-registry-config-path={containerd.certs_dir}",
        *args,
    )
    assert result.stderr == ""
    print(result.stdout)
    return result.returncode, result.stdout.splitlines()


def node_config(node_yaml: Path) -> dict[str, str]:
    return yaml.safe_load(node_yaml.read_text())


def good_lines(containerd: Containerd, node_yaml: Path) -> list[str]:
    """Patterns of every line of a node that passes, in order: the peer is B, whatever
    earlier doctors pinged A."""
    config = node_config(node_yaml)
    keys = {key: re.escape(config[key]) for key in ("registry-addr", "metrics-addr", "router-addr")}
    certs, toml = re.escape(str(containerd.certs_dir)), re.escape(str(containerd.config))
    return [
        rf"ok    containerd 1\.\d+\.\S+ at {re.escape(containerd.address)}",
        rf'ok    config_path = "{certs}" \({toml}\)',
        rf"ok    discard_unpacked_layers is off \(unset in {toml}\)",
        rf"ok    {certs}/_default/hosts\.toml: tries http://{keys['registry-addr']} "
        r"\(pull, resolve\), then the registry itself",
        rf"ok    registry http://{keys['registry-addr']}: /v2/ 200, /readyz 200",
        rf"ok    router {keys['router-addr']} answered a DHT ping \(signed with the cluster "
        r"secret\) in \d+\.\d ms",
        rf"ok    1 DHT peer known \(http://{keys['metrics-addr']}/debug/peers\)",
    ]


def assert_lines(lines: list[str], patterns: list[str]) -> None:
    assert len(lines) == len(patterns), lines
    for line, pattern in zip(lines, patterns, strict=True):
        assert re.fullmatch(pattern, line), f"{line!r} does not match {pattern!r}"


def test_a_good_node_passes_every_check(containerd, node):
    code, lines = doctor(containerd, node)
    assert_lines(lines, good_lines(containerd, node))
    assert code == 0


def test_containerd_discarding_layers_without_config_path(containerd, node, tmp_path):
    require("containerd", "ctr")
    broken = Containerd(tmp_path / "broken", cri=DISCARDING)
    try:
        broken.start()
        code, lines = doctor(
            broken,
            node,
            f"--containerd-sock={broken.address}",
            f"--containerd-registry-config-path={containerd.certs_dir}",
        )
    finally:
        broken.stop()
    expected = good_lines(containerd, node)
    expected[0] = rf"ok    containerd 1\.\d+\.\S+ at {re.escape(broken.address)}"
    expected[1] = re.escape(
        f"FAIL  config_path is not set in {broken.config}: set config_path = "
        f'"{containerd.certs_dir}" under [plugins."io.containerd.grpc.v1.cri".registry] '
        "and restart containerd"
    )
    expected[2] = re.escape(
        f"FAIL  discard_unpacked_layers = true in {broken.config}: set it to false under "
        '[plugins."io.containerd.grpc.v1.cri".containerd] and restart containerd; until then '
        "containerd deletes every layer it unpacks and this node has none to serve"
    )
    assert_lines(lines, expected)
    assert code == 1


def test_a_hand_written_mirror_file_without_scheme(containerd, node):
    registry = node_config(node)["registry-addr"]
    directory = containerd.certs_dir / "docker.io"
    directory.mkdir()
    try:
        (directory / "hosts.toml").write_text(
            f'server = "https://registry-1.docker.io"\n[host."{registry}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )
        code, lines = doctor(containerd, node)
    finally:
        shutil.rmtree(directory)
    expected = good_lines(containerd, node)
    expected.insert(
        4,
        re.escape(
            f'FAIL  {directory}/hosts.toml: host "{registry}" has no scheme: containerd tries '
            f"https://{registry}, and when that fails falls back to the upstream without a "
            f'word; write [host."http://{registry}"]'
        ),
    )
    assert_lines(lines, expected)
    assert code == 1


def test_the_expected_hosts_files_follow_the_mirrored_registries(containerd, node, tmp_path):
    """The node's mirrored-registries by default, as the daemon serves them; the flag as
    `spegel-tx configuration` takes it."""
    ghcr_node = tmp_path / "node.yaml"
    ghcr_node.write_text(yaml.safe_dump(node_config(node) | {"mirrored-registries": ["ghcr.io"]}))
    for node_yaml, flags, registry in [
        (ghcr_node, [], "ghcr.io"),
        (node, ["--mirrored-registries", "https://docker.io", "https://quay.io"], "docker.io"),
    ]:
        code, lines = doctor(containerd, node_yaml, *flags)
        assert lines[3].startswith(
            f"FAIL  no {containerd.certs_dir}/{registry}/hosts.toml: containerd pulls "
            f"{registry} without the mirror; run spegel-tx configuration"
        )
        assert code == 1
    assert lines[4].startswith(f"FAIL  no {containerd.certs_dir}/quay.io/hosts.toml")
    assert lines[5].startswith(f"ok    {containerd.certs_dir}/_default/hosts.toml: tries")


def test_spegel_tx_not_running(containerd, node, tmp_path):
    keys = containerd.node_keys(loopback_host())
    idle = tmp_path / "node.yaml"
    idle.write_text(yaml.safe_dump(keys))
    code, lines = doctor(containerd, idle)
    assert all(line.startswith("ok    ") for line in lines[:4]), lines
    assert lines[4:] == [
        f"FAIL  registry http://{keys['registry-addr']}/v2/ not reachable (Connection refused): "
        f"is spegel-tx running with registry-addr {keys['registry-addr']}?",
        f"FAIL  router {keys['router-addr']}: nothing listens on UDP "
        f"{str(keys['router-addr']).rsplit(':', 1)[1]}: is spegel-tx running with router-addr "
        f"{keys['router-addr']}?",
        f"FAIL  http://{keys['metrics-addr']}/debug/peers not reachable (Connection refused): "
        "check metrics-addr",
    ]
    assert code == 1


def test_a_ping_with_another_secret_gets_no_answer(containerd, node):
    router = node_config(node)["router-addr"]
    result = spegel_tx_cli(
        "doctor",
        f"--config={node}",
        f"--containerd-config={containerd.config}",
        f"--containerd-registry-config-path={containerd.certs_dir}",
        "--timeout=0.3",
        env={"ROUTER_SECRET": "not-the-cluster-secret"},
    )
    assert result.returncode == 1
    assert result.stdout.splitlines()[-2] == (
        f"FAIL  router {router} did not answer a DHT ping (signed with the cluster secret) "
        f"within 0.3s: check router-addr, that UDP {router.rsplit(':', 1)[1]} is open, and "
        "that ROUTER_SECRET or router-secret-file is the node's"
    )


def test_containerd_not_reachable(containerd, node, tmp_path):
    absent = tmp_path / "absent.sock"
    code, lines = doctor(containerd, node, f"--containerd-sock={absent}")
    assert lines[0].startswith(f"FAIL  containerd not reachable at {absent} (")
    assert lines[0].endswith(
        "check containerd-sock, that containerd runs, and that this user may open the socket"
    )
    assert code == 1
