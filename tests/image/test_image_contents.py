"""What deploy/image/build.sh puts in the image, read from its OCI layout."""

from __future__ import annotations

import hashlib
import tarfile

from deploy.image import build
from tests.support.image import BuiltImage, build_image

SITE = "usr/local/lib/python3.11/dist-packages"


def test_the_configuration_is_the_dockerfiles(spegel_tx_image: BuiltImage):
    image = spegel_tx_image.config()
    labels = image["config"]["Labels"]
    arguments = {
        "VERSION": labels["org.opencontainers.image.version"],
        "REVISION": labels["org.opencontainers.image.revision"],
        "SOURCE_URL": labels["org.opencontainers.image.source"],
    }
    assert image["config"] == build.image_config(build.DOCKERFILE, arguments)
    assert image["os"] == "linux"
    assert [
        entry["created_by"].rsplit("; ", 1)[-1].split(": ")[-1] for entry in image["history"]
    ] == [
        "install.py system",
        "install.py dependencies",
        "install.py package",
    ]
    assert spegel_tx_image.reference == f"docker.io/library/spegel-tx:{spegel_tx_image.tag}"


def test_the_daemon_and_its_commands_are_where_the_dockerfile_puts_them(
    spegel_tx_image: BuiltImage,
):
    files = spegel_tx_image.files()
    for command in ("twistd", "spegel-tx"):
        script = files[f"usr/local/bin/{command}"]
        assert script.isfile() and script.mode & 0o111
    assert files["usr/bin/python3"].issym() and files["usr/bin/python3"].linkname == "python3.11"
    assert f"{SITE}/spegel_tx/__init__.py" in files
    assert f"{SITE}/spegel_tx/web/index.html" in files
    assert "etc/os-release" in files and "var/lib/dpkg/status" in files
    plugins = {
        name: info for name, info in files.items() if name.startswith(f"{SITE}/twisted/plugins/")
    }
    cache = plugins.pop(f"{SITE}/twisted/plugins/dropin.cache")
    modules = [info for name, info in plugins.items() if name.endswith(".py")]
    assert f"{SITE}/twisted/plugins/spegel_plugin.py" in plugins
    assert all(module.mtime < cache.mtime for module in modules), "Twisted would rescan"


def test_the_user_is_in_the_images_passwd(spegel_tx_image: BuiltImage):
    layout = spegel_tx_image.layout
    manifest = spegel_tx_image.manifest()
    passwd = None
    for layer in manifest["layers"]:
        path = layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
        with tarfile.open(path, "r:gz") as tar:
            try:
                passwd = tar.extractfile("etc/passwd").read().decode()
            except KeyError:
                continue
    assert passwd is not None
    assert "spegel-tx:x:10001:10001:" in passwd
    assert spegel_tx_image.config()["config"]["User"] == "10001:10001"


def test_nothing_the_daemon_does_not_need(spegel_tx_image: BuiltImage):
    files = spegel_tx_image.files()
    unwanted = (
        "bin/sh",
        "usr/bin/dpkg",
        "usr/bin/apt",
        "usr/bin/gcc",
        "usr/bin/cc",
        "usr/bin/tar",
        "usr/local/bin/pip",
        f"{SITE}/pip",
        "usr/share/man",
        "usr/share/info",
        "usr/share/locale",
        "var/lib/apt/lists",
        "var/cache/apt",
        "etc/apt",
        f"{SITE}/twisted/test",
        f"{SITE}/twisted/web/test",
    )
    assert [path for path in unwanted if path in files] == []
    docs = [name for name in files if name.startswith("usr/share/doc/") and files[name].isfile()]
    assert docs and all(name.endswith("/copyright") for name in docs)
    assert not any(name.startswith("tmp/") for name in files)


def test_layers_hold_sorted_root_owned_entries_no_newer_than_the_build(
    spegel_tx_image: BuiltImage,
):
    created = spegel_tx_image.config()["created"]
    manifest = spegel_tx_image.manifest()
    assert len(manifest["layers"]) == 3
    for layer in manifest["layers"]:
        path = spegel_tx_image.layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
        with tarfile.open(path, "r:gz") as tar:
            members = tar.getmembers()
        names = [member.name for member in members]
        assert names == sorted(names)
        # Debian's /usr/local is root:staff (50), setgid, as in any Debian image.
        assert {member.uid for member in members} == {0}
        assert {member.gid for member in members} <= {0, 50}
        assert max(member.mtime for member in members) <= _epoch(created)


def test_a_second_build_gives_the_same_archive(spegel_tx_image: BuiltImage, tmp_path):
    """Reproducible: the same commit built again (same day, same mirrors) is bit for bit
    the same archive, layers and all."""
    if spegel_tx_image.seconds is None:
        import pytest

        pytest.skip("the image was given (SPEGEL_TX_IMAGE_ARCHIVE), not built here")
    again = build_image(tmp_path)
    layers = [layer["digest"] for layer in spegel_tx_image.manifest()["layers"]]
    assert [layer["digest"] for layer in again.manifest()["layers"]] == layers
    assert again.config() == spegel_tx_image.config(), "built from another commit?"
    assert _sha256(again.archive) == _sha256(spegel_tx_image.archive)


def _epoch(created: str) -> int:
    import datetime

    return int(datetime.datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp())


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
