"""What `pip install .` gives an operator, checked from outside the source tree."""

import os
import subprocess
import sys

import spegel_tx

DISCOVER = """
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
import twisted.plugins.spegel_plugin as plugin
print(plugin.__file__)
print(sorted(p.tapname for p in getPlugins(IServiceMaker)))
"""


def run_outside_tree(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
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
        "spegel-tx: invalid configuration: registry-addr: 5000 is not a string"
    ]
