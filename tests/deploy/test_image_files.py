"""deploy/Dockerfile, deploy/image/build.py and the chart agree, read from the files alone
(no Docker here): one entrypoint, user, set of ports, labels and install steps."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import spegel_tx
from deploy.image import build, install
from deploy.render import CHART, render, split_documents
from spegel_tx.cli import REGISTRY_ARGUMENTS
from spegel_tx.config import Config

pytest.importorskip("dockerfile_parse", reason="pip install dockerfile-parse (in .ci/run)")

ROOT = Path(__file__).resolve().parents[2]
BUILD_ARGS = {"VERSION": "9.9.9", "REVISION": "abc123", "SOURCE_URL": "https://example.test/x"}


def dockerfile_config() -> dict:
    return build.image_config(build.DOCKERFILE, BUILD_ARGS)


def final_stage_runs() -> list[str]:
    """The RUN lines of the Dockerfile's last stage."""
    from dockerfile_parse import DockerfileParser

    runs: list[str] = []
    for instruction in DockerfileParser(str(build.DOCKERFILE)).structure:
        if instruction["instruction"] == "FROM":
            runs = []
        elif instruction["instruction"] == "RUN":
            runs.append(instruction["value"])
    return runs


def rendered_daemonset() -> dict:
    for text in render().values():
        for document in split_documents(text):
            loaded = yaml.safe_load(document)
            if loaded["kind"] == "DaemonSet" and loaded["metadata"]["name"] == "spegel-tx":
                return loaded
    raise AssertionError("no spegel-tx DaemonSet")


def test_build_takes_its_configuration_from_the_dockerfiles_last_stage():
    config = dockerfile_config()
    assert config["Entrypoint"] == ["spegel-tx"], "as Spegel's image's is `spegel`"
    assert config["Cmd"] == ["registry"], "with no arguments, the node"
    assert config["User"] == f"{install.UID}:{install.UID}"
    assert config["WorkingDir"] == "/"
    assert config["Env"] == [
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "PYTHONUNBUFFERED=1",
        "PYTHONDONTWRITEBYTECODE=1",
    ]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == "9.9.9"
    assert labels["org.opencontainers.image.revision"] == "abc123"
    assert labels["org.opencontainers.image.source"] == "https://example.test/x"


def test_labels_say_the_packages_version_and_licence():
    config = build.image_config(build.DOCKERFILE, {})
    labels = config["Labels"]
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert labels["org.opencontainers.image.version"] == spegel_tx.__version__
    assert build.package_version() == spegel_tx.__version__ == chart["appVersion"]
    assert labels["org.opencontainers.image.licenses"] == setup["metadata"]["license"] == "MIT"
    assert labels["org.opencontainers.image.title"] == "spegel-tx"


def test_the_exposed_ports_are_the_daemons_defaults():
    config = dockerfile_config()
    defaults = Config()
    assert set(config["ExposedPorts"]) == {
        f"{defaults.registry_addr.port}/tcp",
        f"{defaults.router_addr.port}/udp",
        f"{defaults.metrics_addr.port}/tcp",
    }


def test_the_charts_daemon_command_is_what_the_images_default_runs_with_its_node_yaml():
    """Kubernetes' command and args replace the image's; the chart runs the same daemon
    as ``spegel-tx registry``, twistd's own command line."""
    spec = rendered_daemonset()["spec"]["template"]["spec"]
    (daemon,) = spec["containers"]
    assert daemon["command"] + daemon["args"] == [
        "twistd",
        *REGISTRY_ARGUMENTS,
        "spegel",
        "--config=/etc/spegel-tx/node.yaml",
    ]
    (init,) = spec["initContainers"]
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    scripts = setup["options.entry_points"]["console_scripts"]
    assert init["command"] == ["spegel-tx"]
    assert re.search(r"^spegel-tx = ", scripts, re.MULTILINE)


def test_both_builds_run_the_same_install_steps_in_the_same_order():
    """One layer per step in both; the Dockerfile's stage runs install.py as build.py does."""
    runs = final_stage_runs()
    steps = [
        match.group(1)
        for run in runs
        for match in [re.search(r"python3 /tmp/image/install\.py (\w+)$", run)]
        if match
    ]
    assert steps == list(build.STAGES) == list(install.STAGES)
    apt = next(run for run in runs if "apt-get install" in run)
    installed = set(re.search(r"--no-install-recommends ([\w+.\- ]+?) \&\&", apt).group(1).split())
    # base-files is in every Debian image, debian:bookworm-slim included.
    assert installed == set(build.PACKAGES) - {"base-files"}


def test_dockerignore_lets_in_what_the_wheel_and_install_steps_read():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert set(build.SOURCES) <= allowed
    assert {
        "deploy/image/install.py",
        "deploy/image/requirements.txt",
        "deploy/image/build-requirements.txt",
    } <= allowed


def test_every_requirement_is_pinned_with_hashes():
    """requirements.txt (deploy/image/lock.py) pins setup.cfg's install_requires and their
    own requirements, each with the hashes pip checks."""
    text = (build.HERE / "requirements.txt").read_text()
    pins = {}
    for entry in re.split(r"\n(?=\S)", text.strip()):
        if entry.startswith("#"):
            continue
        name, _, rest = entry.partition("==")
        assert "--hash=sha256:" in rest, name
        pins[canonicalize_name(name)] = rest.split()[0]
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    for line in filter(None, setup["options"]["install_requires"].splitlines()):
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in deploy/image/requirements.txt: run lock.py"
        assert requirement.specifier.contains(pins[name]), f"{name} {pins[name]}: run lock.py"
