"""The pure parts of the image build (deploy/image/build.py) and of the test harness that
runs the image as the kubelet would (tests/support/runc_security.py, image.py)."""

from __future__ import annotations

import stat

import pytest

from deploy.image import build
from tests.support import runc_security
from tests.support.image import expand, quantity_bytes

FILE = stat.S_IFREG | 0o644
DIRECTORY = stat.S_IFDIR | 0o755


def entry(mode: int, size: int = 0, mtime: int = 1, link: str = "") -> tuple:
    return (mode, 0, 0, size, mtime, link)


def test_a_layer_holds_new_and_changed_entries_not_directories_touched_by_them():
    before = {"usr": entry(DIRECTORY), "usr/a": entry(FILE, 1), "usr/b": entry(FILE, 1)}
    after = before | {
        "usr": entry(DIRECTORY, mtime=9),
        "usr/b": entry(FILE, 2, mtime=9),
        "usr/c": entry(FILE, 3),
        "usr/d": entry(DIRECTORY),
    }
    assert build.changes(before, after) == ["usr/b", "usr/c", "usr/d"]


def test_a_directory_whose_mode_changed_is_in_the_layer():
    before = {"tmp": entry(DIRECTORY)}
    assert build.changes(before, {"tmp": entry(stat.S_IFDIR | 0o1777)}) == ["tmp"]


def test_a_removed_entry_stops_the_build():
    with pytest.raises(SystemExit, match="whiteouts"):
        build.changes({"etc/x": entry(FILE)}, {})


def test_dpkg_status_lists_packages_by_name_as_installed():
    controls = [
        "Package: zlib1g\nVersion: 1\nArchitecture: amd64\n",
        "Package: base-files\nVersion: 12\n",
    ]
    assert build.dpkg_status(controls) == (
        "Package: base-files\nStatus: install ok installed\nVersion: 12\n\n"
        "Package: zlib1g\nStatus: install ok installed\nVersion: 1\nArchitecture: amd64\n"
    )


@pytest.mark.parametrize(
    ("name", "normalized"),
    [
        ("spegel-tx", "docker.io/library/spegel-tx"),
        ("example/spegel-tx", "docker.io/example/spegel-tx"),
        ("registry.example.com/spegel-tx", "registry.example.com/spegel-tx"),
        ("localhost/spegel-tx", "localhost/spegel-tx"),
        ("127.0.0.1:5000/x/spegel-tx", "127.0.0.1:5000/x/spegel-tx"),
    ],
)
def test_image_names_are_completed_as_containerd_completes_them(name, normalized):
    assert build.normalized_name(name) == normalized


def test_wheel_platforms_run_on_bookworms_glibc():
    tags = build.platforms("aarch64")
    assert tags[0] == "manylinux_2_36_aarch64"
    assert "manylinux_2_17_aarch64" in tags and "manylinux2014_aarch64" in tags
    assert not any("2_37" in tag or "x86_64" in tag for tag in tags)


def test_umoci_options_carry_every_field():
    options = build.umoci_config_options(
        {
            "User": "10001:10001",
            "WorkingDir": "/",
            "Entrypoint": ["twistd", "--pidfile="],
            "Env": ["A=1"],
            "ExposedPorts": {"5000/tcp": {}},
            "Labels": {"k": "v=w"},
        }
    )
    assert options == [
        "--config.user=10001:10001",
        "--config.workingdir=/",
        "--config.entrypoint=twistd",
        "--config.entrypoint=--pidfile=",
        "--config.env=A=1",
        "--config.exposedports=5000/tcp",
        "--config.label=k=v=w",
    ]


def spec(tmp_path) -> dict:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/:/x\nspegel-tx:x:10001:10001::/:/x\n")
    caps = ["CAP_CHOWN", "CAP_NET_RAW"]
    return {
        "root": {"path": str(tmp_path), "readonly": False},
        "process": {
            "user": {"uid": 10001, "gid": 10001},
            "capabilities": {name: list(caps) for name in runc_security.CAPABILITY_SETS},
        },
    }


def test_the_charts_security_context_becomes_root_without_capabilities(tmp_path):
    config = spec(tmp_path)
    context = {
        "runAsUser": 0,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    runc_security.apply(config, context, {})
    assert config["process"]["user"] == {"uid": 0, "gid": 0, "additionalGids": []}
    assert all(not caps for caps in config["process"]["capabilities"].values())
    assert config["process"]["noNewPrivileges"] is True
    assert config["root"]["readonly"] is True


def test_a_user_takes_its_group_from_the_images_passwd_and_the_pods_groups(tmp_path):
    config = spec(tmp_path)
    runc_security.apply(
        config,
        {"capabilities": {"drop": ["NET_RAW"]}},
        {"runAsUser": 10001, "supplementalGroups": [7]},
    )
    assert config["process"]["user"] == {"uid": 10001, "gid": 10001, "additionalGids": [7]}
    assert config["process"]["capabilities"]["bounding"] == ["CAP_CHOWN"]


def test_an_empty_security_context_keeps_the_images_user(tmp_path):
    config = spec(tmp_path)
    runc_security.apply(config, {}, {})
    assert config["process"]["user"] == {"uid": 10001, "gid": 10001}


def test_the_kubelets_variable_expansion():
    environment = {"NODE_IP": "10.0.0.5"}
    assert expand("http://$(NODE_IP):30020", environment) == "http://10.0.0.5:30020"
    assert expand("$(UNSET) $$(NODE_IP)", environment) == "$(UNSET) $(NODE_IP)"


def test_memory_quantities():
    assert quantity_bytes("256Mi") == 256 << 20
    assert quantity_bytes("1G") == 10**9
    with pytest.raises(ValueError):
        quantity_bytes("1.5Gi")
