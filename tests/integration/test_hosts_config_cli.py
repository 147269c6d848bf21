"""`spegel-tx configuration` and `cleanup` as processes, and containerd following their files."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from tests.support.loopback import loopback_host
from tests.support.processes import free_port, spegel_tx_cli

pytestmark = pytest.mark.integration

MIRROR = "http://127.0.0.1:5000"


def tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(path.relative_to(root)): None if path.is_dir() else path.read_bytes()
        for path in sorted(root.rglob("*"))
    }


def test_configuration_then_cleanup_twice_each_restores_the_directory(tmp_path):
    certs = tmp_path / "certs.d"
    (certs / "docker.io").mkdir(parents=True)
    (certs / "docker.io" / "hosts.toml").write_text(
        'server = "https://registry-1.docker.io"\n[host."https://corp-mirror"]\n  ca = "ca.pem"\n'
    )
    (certs / "docker.io" / "ca.pem").write_text("CA")
    (certs / "registry.internal").mkdir()
    (certs / "registry.internal" / "hosts.toml").write_text('server = "https://internal"\n')
    before = tree(certs)
    # Spegel's Helm chart passes its init container exactly these arguments.
    args = [
        "configuration",
        "--log-level=INFO",
        f"--containerd-registry-config-path={certs}",
        "--mirrored-registries",
        "https://docker.io",
        "https://ghcr.io",
        "--mirror-targets",
        MIRROR,
        "--resolve-tags=true",
        "--prepend-existing=true",
    ]
    first = spegel_tx_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"wrote {certs}/docker.io/hosts.toml",
        f"wrote {certs}/ghcr.io/hosts.toml",
    ]
    configured = tree(certs)
    assert spegel_tx_cli(*args).returncode == 0
    assert tree(certs) == configured, "a second run must change nothing"

    assert sorted(p.name for p in certs.iterdir()) == ["_backup", "docker.io", "ghcr.io"]
    hub = tomllib.loads((certs / "docker.io" / "hosts.toml").read_text())
    assert hub["server"] == "https://registry-1.docker.io"
    assert list(hub["host"]) == [MIRROR, "https://corp-mirror"]
    assert hub["host"][MIRROR] == {"capabilities": ["pull", "resolve"], "dial_timeout": "200ms"}
    assert (certs / "docker.io" / "ca.pem").read_text() == "CA"
    assert tomllib.loads((certs / "ghcr.io" / "hosts.toml").read_text())["server"] == (
        "https://ghcr.io"
    )

    for expected in (f"restored from {certs}/_backup", f"nothing to restore: no {certs}/_backup"):
        result = spegel_tx_cli("cleanup", "--containerd-registry-config-path", str(certs))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected
        assert tree(certs) == before


def test_bad_input_exits_2_with_one_line_naming_the_flag(tmp_path):
    result = spegel_tx_cli(
        "configuration",
        "--containerd-registry-config-path",
        str(tmp_path / "certs.d"),
        "--mirrored-registries",
        "docker.io",
        "--mirror-targets",
        MIRROR,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "spegel-tx configuration: error: --mirrored-registries: 'docker.io' is not an "
        "http:// or https:// URL such as https://docker.io"
    ]
    assert not (tmp_path / "certs.d").exists()


def test_a_directory_that_cannot_be_written_exits_1_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = spegel_tx_cli(
        "configuration",
        f"--containerd-registry-config-path={blocker}/certs.d",
        env={"MIRROR_TARGETS": MIRROR},
    )
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("spegel-tx configuration: error: ") and "Not a directory" in line


# --- containerd reading what `configuration` wrote ------------------------------------------


@pytest.fixture
def tagged_image(containerd, demo_image):
    """The demo image in a namespace of its own, also named after a closed loopback port.

    A pull of that name that misses the mirror falls back to a refused connection on
    a loopback address of this run's own, never to the network. Both namespaces are
    emptied afterwards.
    """
    host = loopback_host()
    upstream = f"{host}:{free_port(host)}"
    name = f"{upstream}/{demo_image.repository}:{demo_image.tag}"
    source, target = "hostsconfig-src", "hostsconfig-dst"
    containerd.ctr("images", "import", str(demo_image.archive), namespace=source)
    try:
        containerd.ctr("images", "tag", demo_image.name, name, namespace=source)
        yield upstream, name, source, target
    finally:
        for namespace in (source, target):
            listed = containerd.ctr("images", "ls", "-q", namespace=namespace).split()
            if listed:
                containerd.ctr("images", "rm", *listed, namespace=namespace)


def mirror_requests(node) -> list[str]:
    return [
        record["path"]
        for record in map(json.loads, node.log_path.read_text().splitlines())
        if record.get("namespace") == "spegel_tx.access" and record["path"].startswith("/v2/")
    ]


@pytest.mark.parametrize("mirrored", ["upstream", "all registries"])
def test_ctr_pulls_through_the_mirror_the_generated_file_names(
    spegel_node, containerd, tagged_image, tmp_path, mirrored
):
    upstream, name, source, target = tagged_image
    node = spegel_node(containerd, containerd_namespace=source)
    certs = tmp_path / "certs.d"
    registries = ["--mirrored-registries", f"http://{upstream}"] if mirrored == "upstream" else []
    result = spegel_tx_cli(
        "configuration",
        f"--containerd-registry-config-path={certs}",
        *registries,
        "--mirror-targets",
        node.url,
    )
    assert result.returncode == 0, result.stderr

    containerd.ctr("images", "pull", "--hosts-dir", str(certs), name, namespace=target)
    assert name in containerd.ctr("images", "ls", "-q", namespace=target).split()
    ns = "?ns=" + upstream.replace(":", "%3A")
    requests = mirror_requests(node)
    assert f"/v2/library/demo/manifests/v1{ns}" in requests, requests
    assert all(path.endswith(ns) for path in requests), requests


def test_without_resolve_tags_containerd_asks_the_upstream_for_the_tag(
    spegel_node, containerd, tagged_image, tmp_path
):
    _, name, source, target = tagged_image
    node = spegel_node(containerd, containerd_namespace=source)
    certs = tmp_path / "certs.d"
    result = spegel_tx_cli(
        "configuration",
        f"--containerd-registry-config-path={certs}",
        "--mirror-targets",
        node.url,
        "--resolve-tags=false",
    )
    assert result.returncode == 0, result.stderr
    with pytest.raises(RuntimeError, match="connection refused"):
        containerd.ctr("images", "pull", "--hosts-dir", str(certs), name, namespace=target)
    assert mirror_requests(node) == []
