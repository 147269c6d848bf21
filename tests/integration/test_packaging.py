"""What `pip install .` gives an operator, checked from outside the source tree."""

import json
import os
import subprocess
import sys
import urllib.request

import yaml

import spegel_tx
from tests.support.loopback import loopback_host
from tests.support.processes import free_ports, start_process, stop_process, wait_for_http

DISCOVER = """
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
import twisted.plugins.spegel_plugin as plugin
print(plugin.__file__)
print(sorted(p.tapname for p in getPlugins(IServiceMaker)))
"""


def outside_tree_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def run_outside_tree(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    env = outside_tree_environment()
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)


def test_installed_plugin_is_discovered(tmp_path):
    result = run_outside_tree(tmp_path, sys.executable, "-c", DISCOVER)
    assert result.returncode == 0, result.stderr
    location, names = result.stdout.splitlines()
    assert "site-packages" in location or "dist-packages" in location, (
        "the plugin must come from the installed package; run `pip install .`"
    )
    assert "'spegel'" in names


def test_console_script_prints_the_version(tmp_path):
    result = run_outside_tree(tmp_path, "spegel-tx", "version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"spegel-tx {spegel_tx.__version__}"


def test_twistd_refuses_a_bad_config_with_one_line(tmp_path):
    bad = tmp_path / "node.yaml"
    bad.write_text("registry-addr: 5000\n")
    result = run_outside_tree(
        tmp_path, "twistd", "-n", "--pidfile=", "spegel", "--config", str(bad)
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "spegel-tx: registry-addr: 5000 is not an address: write host:port or :port, in quotes"
    ]


def test_the_installed_package_serves_the_debug_page(tmp_path):
    """The page's files are package data: a node installed with pip must serve them too."""
    host = loopback_host()
    registry, router, metrics = free_ports(host, 3)
    config = tmp_path / "node.yaml"
    keys = {
        "registry-addr": f"{host}:{registry}",
        "router-addr": f"{host}:{router}",
        "metrics-addr": f"{host}:{metrics}",
        "containerd-sock": str(tmp_path / "no-containerd.sock"),
        "debug-web-enabled": True,
    }
    config.write_text(yaml.safe_dump(keys))
    log = tmp_path / "twistd.log"
    process = start_process(
        ["twistd", "-n", "--pidfile=", "spegel", "--config", str(config)],
        log,
        cwd=tmp_path,
        env=outside_tree_environment(),
    )
    try:
        page = f"http://{host}:{metrics}/debug/web/"
        wait_for_http(page, process, log, 30)
        for name in ("app.js", "style.css", "api/node"):
            with urllib.request.urlopen(page + name, timeout=10) as response:
                assert response.status == 200 and response.read(), name
    finally:
        stop_process(process)


def test_the_console_script_runs_the_node_as_spegels_registry_subcommand(tmp_path):
    """What a Spegel DaemonSet's container runs with this image: `spegel-tx registry ...`."""
    host = loopback_host()
    registry, router, metrics = free_ports(host, 3)
    log = tmp_path / "registry.log"
    process = start_process(
        [
            "spegel-tx",
            "registry",
            f"--registry-addr={host}:{registry}",
            f"--router-addr={host}:{router}",
            f"--metrics-addr={host}:{metrics}",
            f"--containerd-sock={tmp_path / 'no-containerd.sock'}",
            "--mirrored-registries",
            "https://docker.io",
            "https://ghcr.io",
        ],
        log,
        cwd=tmp_path,
        env=outside_tree_environment(),
    )
    try:
        wait_for_http(f"http://{host}:{registry}/livez", process, log, 30)
    finally:
        stop_process(process)
    said = [json.loads(line)["msg"] for line in log.read_text().splitlines()]
    started = [line for line in said if line.startswith(f"spegel-tx {spegel_tx.__version__}: ")]
    assert started and started[0].startswith(f"spegel-tx {spegel_tx.__version__}: registry {host}:")
