"""The systemd units: systemd accepts them, and their commands do what the units say."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

from spegel_tx.config import load_config, router_secret
from tests.support.processes import ROOT, spegel_tx_cli

UNITS = ROOT / "deploy" / "systemd"
BIN = "/usr/local/bin/"
CERTS_D = "/etc/containerd/certs.d"


def unit_settings(name: str) -> dict[str, str]:
    """``Key=value`` settings of a unit, continuation lines joined (no key repeats here)."""
    text = (UNITS / name).read_text().replace("\\\n", " ")
    settings = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings[key] = value
    return settings


def exec_start(name: str) -> list[str]:
    args = shlex.split(unit_settings(name)["ExecStart"])
    assert args[0].startswith(BIN), "pip installs console scripts of the system Python there"
    return args


def test_systemd_analyze_verify_accepts_both_units(tmp_path):
    """The units name /usr/local/bin, where `pip install` puts the commands on a node;
    verify checks that ExecStart exists, so copies name wherever they are installed here."""
    for name in ("spegel-tx.service", "spegel-tx-configure.service"):
        text = (UNITS / name).read_text()
        for command in ("twistd", "spegel-tx"):
            installed = shutil.which(command)
            assert installed, f"{command} is not installed"
            text = text.replace(f"{BIN}{command} ", f"{installed} ")
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(map(str, tmp_path.iterdir()))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_daemon_runs_the_example_node_yaml(twistd_config, tmp_path):
    args = exec_start("spegel-tx.service")
    assert args[0] == f"{BIN}twistd"
    # The secret file the example names is made on the node (see its comment); here,
    # one made the same way stands in for it.
    secret = tmp_path / "router-secret"
    secret.write_bytes(os.urandom(24).hex().encode())
    example = tmp_path / "node.yaml"
    example.write_text(
        (UNITS / "node.yaml").read_text().replace("/etc/spegel-tx/router-secret", str(secret))
    )
    args = [a.replace("/etc/spegel-tx/node.yaml", str(example)) for a in args[1:]]
    config = twistd_config(args)
    assert config == load_config(str(example), environ={})
    assert config.bootstrap_kind == "static" and config.static_bootstrap_peers
    assert config.data_dir == f"/var/lib/{unit_settings('spegel-tx.service')['StateDirectory']}"


def test_the_example_signs_the_dht_with_the_secret_its_comment_makes(tmp_path):
    config = load_config(str(UNITS / "node.yaml"), environ={})
    assert config.router_secret_file == "/etc/spegel-tx/router-secret"
    text = (UNITS / "node.yaml").read_text()
    (command,) = [line.strip("# ") for line in text.splitlines() if "/dev/urandom" in line]
    made = tmp_path / "router-secret"
    command = command.replace(config.router_secret_file, str(made))
    subprocess.run(["sh", "-c", command], check=True, timeout=10)
    assert made.stat().st_mode & 0o077 == 0, "readable by root only"
    with_file = dataclasses.replace(config, router_secret_file=str(made))
    secret = router_secret(with_file, environ={})
    assert secret is not None and len(secret) >= 32


def test_configure_points_containerd_at_the_node_yaml_registry(tmp_path):
    settings = unit_settings("spegel-tx-configure.service")
    assert f"/etc/{settings['ConfigurationDirectory']}" == CERTS_D, "the one writable place"
    assert "containerd.service" in settings["Before"].split()
    args = exec_start("spegel-tx-configure.service")
    certs = tmp_path / "certs.d"
    result = spegel_tx_cli(*[a.replace(CERTS_D, str(certs)) for a in args[1:]])
    assert result.returncode == 0, result.stderr
    hosts = tomllib.loads((certs / "_default" / "hosts.toml").read_text())["host"]
    port = load_config(str(UNITS / "node.yaml"), environ={}).registry_addr.port
    assert list(hosts) == [f"http://127.0.0.1:{port}"]
    assert hosts[f"http://127.0.0.1:{port}"]["capabilities"] == ["pull", "resolve"]


def test_units_harden_what_they_can():
    for name, writable in (
        ("spegel-tx.service", "StateDirectory"),
        ("spegel-tx-configure.service", "ConfigurationDirectory"),
    ):
        settings = unit_settings(name)
        assert settings["ProtectSystem"] == "strict" and writable in settings, name
        assert settings["NoNewPrivileges"] == "yes", name
        assert settings["CapabilityBoundingSet"] == "", name
        assert settings["ProtectHome"] == settings["PrivateTmp"] == "yes", name
    daemon = unit_settings("spegel-tx.service")
    assert daemon["Restart"] == "always"
    assert set(daemon["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert Path(daemon["ReadOnlyPaths"].lstrip("-")) == Path(
        load_config(str(UNITS / "node.yaml"), environ={}).containerd_content_path
    )
