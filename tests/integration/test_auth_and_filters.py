"""Basic authentication, registry-filters and the answers containerd sees, with real
containerd and two nodes: A beside the session containerd holding the demo image, B
beside an empty containerd of its own, finding A through the DHT."""

from __future__ import annotations

import json
import subprocess
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Node
from tests.support.containerd import Containerd
from tests.support.processes import poll, spegel_tx_cli

pytestmark = pytest.mark.integration


def ask(method: str, url: str, headers: dict[str, str] | None = None) -> Any:
    """The response, whatever its status (read its body before it is closed)."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        return urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as error:
        return error


def access(node: Node) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in node.log_path.read_text().splitlines()]
    return [r for r in records if r.get("namespace") == "spegel_tx.access"]


def providers(asker: Node, key: str) -> list[str]:
    url = f"{asker.metrics_url}/debug/lookup?key={urllib.parse.quote(key)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return [
            f"{p['host']}:{p['registry_port']}" for p in json.loads(response.read())["providers"]
        ]


def wait_until_found(asker: Node, holder: Node, keys: list[str]) -> None:
    found = poll(lambda: all(holder.address in providers(asker, key) for key in keys), 15, 0.2)
    assert found, f"{asker.address} never found {holder.address} for {keys}"


@pytest.fixture
def empty_containerd(tmp_path: Path):
    instance = Containerd(tmp_path / "containerd-b")
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def secret(directory: Path, username: str, password: str) -> dict[str, str]:
    """A Secret's files, as the chart mounts them, and the keys that name them."""
    directory.mkdir()
    (directory / "username").write_text(username)
    (directory / "password").write_text(password)
    return {
        "basic_auth_username_file": str(directory / "username"),
        "basic_auth_password_file": str(directory / "password"),
    }


def configure(containerd: Containerd, node: Node, auth: dict[str, str]) -> Path:
    """``spegel-tx configuration`` as the chart's init container runs it."""
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in auth.items()]
    result = spegel_tx_cli(
        "configuration",
        f"--containerd-registry-config-path={containerd.certs_dir}",
        "--mirror-targets",
        node.url,
        *flags,
    )
    assert result.returncode == 0, result.stderr
    return containerd.certs_dir / "_default" / "hosts.toml"


def pull(containerd: Containerd, reference: str) -> subprocess.CompletedProcess[str]:
    """What the kubelet's pull amounts to: containerd with the node's hosts.toml. The demo
    image's registry (registry.test) does not exist: only the mirrors can serve it."""
    command = ["ctr", "--address", containerd.address, "-n", containerd.namespace, "images"]
    command += ["pull", "--hosts-dir", str(containerd.certs_dir), reference]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_containerd_pulls_through_two_nodes_with_basic_auth_and_gets_401_without_it(
    spegel_node, containerd, empty_containerd, demo_image, tmp_path
):
    auth = secret(tmp_path / "secret", "spegel", "s3cret-passw0rd")
    a = spegel_node(containerd, **auth)
    b = spegel_node(empty_containerd, static_bootstrap_peers=[a.router_address], **auth)
    wait_until_found(b, a, [demo_image.name, *demo_image.layer_digests])

    # Without the header containerd is answered 401, as is anyone else.
    hosts = configure(
        empty_containerd, b, {"basic_auth_username_file": "", "basic_auth_password_file": ""}
    )
    assert "Authorization" not in hosts.read_text()
    refused = pull(empty_containerd, demo_image.name)
    assert refused.returncode != 0, "registry.test does not exist: nothing else could serve it"
    [head] = [r for r in access(b) if r["method"] == "HEAD"]
    assert head["status"] == 401
    with ask("GET", f"{b.url}/v2/{demo_image.repository}/blobs/{demo_image.config_digest}") as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == 'Basic realm="spegel-tx"'
        assert json.loads(r.read())["errors"][0]["code"] == "UNAUTHORIZED"
    for probe in ("/readyz", "/livez"):
        with ask("GET", b.url + probe) as r:
            assert r.status == 200, probe
    with ask("GET", f"{b.metrics_url}/metrics") as r:
        assert r.status == 200

    # With it (written from the same Secret files) the pull goes B -> A.
    hosts = configure(empty_containerd, b, auth)
    header = tomllib.loads(hosts.read_text())["host"][b.url]["header"]
    assert header["Authorization"].startswith("Basic ")
    pulled = pull(empty_containerd, demo_image.name)
    assert pulled.returncode == 0, pulled.stderr
    assert demo_image.index_digest in empty_containerd.ctr("images", "ls")
    layers_via_b = {
        r["path"].split("?")[0].rsplit("/", 1)[1]
        for r in access(b)
        if r["handler"] == "mirror" and r["status"] == 200 and "/blobs/" in r["path"]
    }
    assert set(demo_image.layer_digests) <= layers_via_b
    served_by_a = {
        r["path"].split("?")[0].rsplit("/", 1)[1] for r in access(a) if r["status"] == 200
    }
    assert set(demo_image.layer_digests) <= served_by_a, "B forwarded with the credentials"
    assert not [r for r in access(a) if r["status"] == 401]

    # The doctor asks /v2/ with the node's own credentials.
    checkup = spegel_tx_cli(
        "doctor",
        f"--config={b.log_path.parent / 'node.yaml'}",
        f"--containerd-config={empty_containerd.config}",
        f"--containerd-registry-config-path={empty_containerd.certs_dir}",
    )
    assert f"ok    registry {b.url}: /v2/ 200, /readyz 200" in checkup.stdout.splitlines()


def test_filters_ns_and_headers_hold_for_content_held_here_and_forwarded(
    spegel_node, containerd, empty_containerd, demo_image
):
    """A filter stops blobs and manifests asked for by digest, here and before forwarding;
    a tag without ns, OCI-Namespace, and a 405's Allow are the same on a node holding the
    image (A) and on one forwarding to it (B)."""
    filters = {"registry_filters": [r"^registry\.test/library/demo$"]}
    a = spegel_node(containerd)
    b = spegel_node(empty_containerd, static_bootstrap_peers=[a.router_address])
    filtered_here = spegel_node(containerd, **filters)
    filtered_there = spegel_node(
        empty_containerd, static_bootstrap_peers=[a.router_address], **filters
    )
    digests = [demo_image.manifest_digest, demo_image.config_digest, *demo_image.layer_digests]
    wait_until_found(b, a, [demo_image.name, *digests])
    wait_until_found(filtered_there, a, digests)
    repository = f"/v2/{demo_image.repository}"
    by_digest = [f"{repository}/manifests/{demo_image.manifest_digest}?ns=registry.test"] + [
        f"{repository}/blobs/{digest}?ns=registry.test" for digest in digests[1:]
    ]

    for node, handler in ((a, "local"), (b, "mirror")):
        for path in by_digest:
            with ask("GET", node.url + path) as r:
                assert r.status == 200, (node.address, path)
                assert r.headers["OCI-Namespace"] == "registry.test"
        tag = f"{node.url}{repository}/manifests/{demo_image.tag}"
        with ask("HEAD", f"{tag}?ns=registry.test") as r:
            assert (r.status, r.headers["OCI-Namespace"]) == (200, "registry.test")
            assert r.headers["Docker-Content-Digest"] == demo_image.index_digest
        with ask("GET", tag) as r:
            assert r.status == 404, "a tag without ns names no one image, held or not"
            assert json.loads(r.read())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        with ask("PUT", f"{tag}?ns=registry.test") as r:
            assert (r.status, r.headers["Allow"]) == (405, "GET, HEAD")
            assert json.loads(r.read())["errors"][0]["code"] == "UNSUPPORTED"
        served = {r["handler"] for r in access(node) if r["path"].startswith(repository)}
        assert served == {handler, "-"}, "content served by the one, errors by neither"

    asked_of_a = len(access(a))
    for node in (filtered_here, filtered_there):
        for path in by_digest:
            with ask("GET", node.url + path) as r:
                assert r.status == 404, (node.address, path)
                [error] = json.loads(r.read())["errors"]
                assert error["code"].endswith("_UNKNOWN")
                assert "registry-filters" in error["message"]
            without_ns = path.split("?")[0]
            with ask("GET", node.url + without_ns) as r:
                assert r.status == 404, "without ns a filter cannot be checked"
    assert len(access(a)) == asked_of_a, "a filtered request is never forwarded"
