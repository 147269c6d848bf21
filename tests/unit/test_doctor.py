"""The doctor's rules as plain functions: containerd config files (versions 1 to 3, imports,
1.x and 2.x merges), hosts.toml as containerd reads it, and the DHT ping datagram."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spegel_tx import cli
from spegel_tx.config import Address, load_config
from spegel_tx.containerd.hostsconfig import MirroredRegistry, render_hosts_toml
from spegel_tx.doctor import (
    DOCTOR_ID,
    ConfigFile,
    Finding,
    check_config_path,
    check_discard,
    check_hosts_files,
    connect_address,
    import_patterns,
    is_pong,
    load_containerd_config,
    no_peers_advice,
    parse_config_file,
    ping_datagram,
    real_peers,
    release,
    review_hosts_toml,
)
from spegel_tx.routing.kademlia.codec import decode, encode
from spegel_tx.routing.kademlia.messages import NO_RECEIVER, Binding, Header, Message, Ping, Pong

MAIN = "/etc/containerd/config.toml"
CERTS = "/etc/containerd/certs.d"
V1_6 = (1, 6)
V2_1 = (2, 1)
V2_2 = (2, 2)
V2_TABLE = '[plugins."io.containerd.grpc.v1.cri".registry]'
V3_TABLE = '[plugins."io.containerd.cri.v1.images".registry]'

GOOD_V2 = f"""\
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  discard_unpacked_layers = false
{V2_TABLE}
  config_path = "{CERTS}"
"""
GOOD_V3 = f"""\
version = 3
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  discard_unpacked_layers = false
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = '{CERTS}'
"""
DISCARD_V2 = """\
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  discard_unpacked_layers = true
"""
DISCARD_V3 = """\
version = 3
[plugins."io.containerd.cri.v1.images"]
  discard_unpacked_layers = true
"""
DEBIAN_DEFAULT = """\
version = 2
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
"""


def files(*texts: str) -> list[ConfigFile]:
    """The main file then its imports, as containerd loads them."""
    paths = [MAIN] + [f"/etc/containerd/conf.d/{i}.toml" for i in range(1, len(texts))]
    return [parse_config_file(path, text) for path, text in zip(paths, texts, strict=True)]


def test_a_finding_prints_as_one_aligned_line():
    assert str(Finding(True, "containerd 1.6.20")) == "ok    containerd 1.6.20"
    assert str(Finding(False, "no peers")) == "FAIL  no peers"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1.6.20~ds1", (1, 6)), ("v2.1.0", (2, 1)), ("2.2.0-rc.1", (2, 2)), ("", None), (None, None)],
)
def test_release_of_a_containerd_version(text, expected):
    assert release(text) == expected


# config_path


@pytest.mark.parametrize(("text", "running"), [(GOOD_V2, V1_6), (GOOD_V3, V2_1), (GOOD_V2, V2_1)])
def test_config_path_set_to_the_hosts_directory_is_ok(text, running):
    finding = check_config_path(files(text), MAIN, CERTS, running)
    assert finding == Finding(True, f'config_path = "{CERTS}" ({MAIN})')


def test_config_path_unset_says_where_to_set_it_for_the_config_version():
    v2 = check_config_path(files(DEBIAN_DEFAULT), MAIN, CERTS, V1_6)
    assert str(v2) == (
        f"FAIL  config_path is not set in {MAIN}: set config_path = "
        f'"{CERTS}" under {V2_TABLE} and restart containerd'
    )
    v3 = check_config_path(files("version = 3\n"), MAIN, CERTS, V2_1)
    assert not v3.passed and f"under {V3_TABLE} and restart" in v3.text


def test_config_path_empty_string_is_unset():
    text = f'version = 2\n{V2_TABLE}\n  config_path = ""\n'
    assert not check_config_path(files(text), MAIN, CERTS, V1_6).passed


def test_config_path_elsewhere_names_both_fixes():
    text = GOOD_V2.replace(CERTS, "/etc/docker/certs.d")
    finding = check_config_path(files(text), MAIN, CERTS, V1_6)
    assert not finding.passed
    assert f'set config_path = "{CERTS}" under {V2_TABLE}' in finding.text
    assert "--containerd-registry-config-path /etc/docker/certs.d" in finding.text


def test_config_path_list_containing_the_hosts_directory_is_ok():
    text = GOOD_V2.replace(CERTS, f"/etc/docker/certs.d:{CERTS}/")
    assert check_config_path(files(text), MAIN, CERTS, V1_6).passed


def test_no_config_file_means_containerd_defaults():
    finding = check_config_path([], MAIN, CERTS, V1_6)
    assert not finding.passed
    assert finding.text.startswith(f"no {MAIN}: containerd runs on its defaults")
    assert f'version = 2 and set config_path = "{CERTS}" under {V2_TABLE}' in finding.text
    assert f'version = 3 and set config_path = "{CERTS}" under {V3_TABLE}' in (
        check_config_path([], MAIN, CERTS, V2_1).text
    )


def test_containerd_2_2_defaults_config_path_to_a_list_its_transfer_service_cannot_read():
    """containerd 2.2 with no config_path uses two directories; its transfer service reads
    that as one directory, so its default setup uses no mirror."""
    for loaded in ([], files("version = 3\n")):
        finding = check_config_path(loaded, MAIN, CERTS, V2_2)
        assert not finding.passed
        assert finding.text.startswith(
            f'config_path = "{DEFAULT_2_2}" (containerd\'s default) lists several directories, '
            "but containerd 2.2 pulls through its transfer service"
        )
    local = files(f"version = 3\n{LOCAL_PULL_V3}")
    assert check_config_path(local, MAIN, CERTS, V2_2) == Finding(
        True,
        f'config_path = "{DEFAULT_2_2}" (containerd\'s default), read as a list: '
        f"use_local_image_pull = true in {MAIN} makes containerd pull without its transfer "
        "service",
    )
    assert not check_config_path(local, MAIN, "/srv/certs.d", V2_2).passed


def test_deprecated_mirrors_stop_the_default_and_conflict_with_config_path():
    mirrors = (
        '[plugins."io.containerd.cri.v1.images".registry.mirrors."docker.io"]\n'
        '  endpoint = ["https://m"]\n'
    )
    alone = check_config_path(files("version = 3\n" + mirrors), MAIN, CERTS, V2_2)
    assert not alone.passed and "config_path is not set" in alone.text
    both = check_config_path(files(GOOD_V3 + mirrors), MAIN, CERTS, V2_1)
    assert not both.passed and "refuses to start; remove the mirrors" in both.text


def test_a_disabled_cri_plugin_fails_whatever_config_path_says():
    finding = check_config_path(files('disabled_plugins = ["cri"]\n'), MAIN, CERTS, V1_6)
    assert not finding.passed and "the CRI plugin is disabled" in finding.text
    text = 'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n' + GOOD_V2
    assert (
        "lists io.containerd.grpc.v1.cri" in check_config_path(files(text), MAIN, CERTS, V1_6).text
    )


def test_version_1_names_the_cri_plugin_cri():
    text = f'[plugins.cri.registry]\n  config_path = "{CERTS}"\n'
    assert check_config_path(files(text), MAIN, CERTS, V1_6).passed
    assert "under [plugins.cri.registry]" in check_config_path(files(""), MAIN, CERTS, V1_6).text


# config_path as a list, and containerd 2.1's transfer service

DEFAULT_2_2 = "/etc/containerd/certs.d:/etc/docker/certs.d"
LOCAL_PULL_V3 = "[plugins.'io.containerd.cri.v1.images']\n  use_local_image_pull = true\n"
EKS_V3 = f"""\
version = 3
root = '/var/lib/containerd'
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  discard_unpacked_layers = false
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = '{DEFAULT_2_2}'
"""
LIST_V2 = GOOD_V2.replace(f'"{CERTS}"', f'"{DEFAULT_2_2}"')
BOTH_FIXES = (
    f'Either set config_path = "{CERTS}" under {{table}}, or set use_local_image_pull = true '
    'under [plugins."io.containerd.cri.v1.images"]; then restart containerd'
)


@pytest.mark.parametrize("running", [V2_1, V2_2, (2, 3)])
def test_a_config_path_list_fails_where_cri_pulls_through_the_transfer_service(running):
    finding = check_config_path(files(EKS_V3), MAIN, CERTS, running)
    assert str(finding) == (
        f'FAIL  config_path = "{DEFAULT_2_2}" ({MAIN}) lists several directories, but '
        f"containerd {running[0]}.{running[1]} pulls through its transfer service, which "
        "reads config_path as one directory: no hosts.toml is read and no pull uses the "
        f"mirror. {BOTH_FIXES.format(table=V3_TABLE)}"
    )


@pytest.mark.parametrize("running", [V1_6, (1, 7), (2, 0)])
def test_a_config_path_list_is_read_as_a_list_before_containerd_2_1(running):
    assert check_config_path(files(LIST_V2), MAIN, CERTS, running) == Finding(
        True, f'config_path = "{DEFAULT_2_2}" ({MAIN})'
    )


def test_either_fix_makes_a_containerd_2_1_config_pass():
    one_directory = EKS_V3.replace(DEFAULT_2_2, CERTS)
    assert check_config_path(files(one_directory), MAIN, CERTS, V2_1).passed
    local = EKS_V3.replace("  snapshotter", "  use_local_image_pull = true\n  snapshotter")
    finding = check_config_path(files(local), MAIN, CERTS, V2_1)
    assert finding.passed and f"use_local_image_pull = true in {MAIN}" in finding.text
    turned_off = local.replace("use_local_image_pull = true", "use_local_image_pull = false")
    assert not check_config_path(files(turned_off), MAIN, CERTS, V2_1).passed


def test_a_version_2_config_on_containerd_2_1_is_migrated_and_fails_the_same_way():
    finding = check_config_path(files(LIST_V2), MAIN, CERTS, V2_1)
    assert not finding.passed
    assert finding.text.endswith(BOTH_FIXES.format(table=V2_TABLE))
    # 2.x keeps an images-plugin section in a version 2 file when it migrates the CRI one.
    fixed = files(LIST_V2 + LOCAL_PULL_V3.replace("'", '"'))
    assert check_config_path(fixed, MAIN, CERTS, V2_1).passed


IMAGES = "[plugins.'io.containerd.cri.v1.images']\n"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            f"{IMAGES}  disable_snapshot_annotations = false\n",
            "disable_snapshot_annotations = false",
        ),
        (f"{IMAGES}  max_concurrent_downloads = 8\n", "max_concurrent_downloads = 8"),
        (f"{IMAGES}  image_pull_with_sync_fs = true\n", "image_pull_with_sync_fs = true"),
        (
            "[plugins.'io.containerd.cri.v1.images'.registry.configs.'r.example'.auth]\n"
            "  username = 'u'\n",
            "registry.configs",
        ),
    ],
)
def test_settings_the_transfer_service_lacks_make_containerd_pull_locally(text, reason):
    """containerd falls back to its local pull, which reads the list, when one is set."""
    finding = check_config_path(files(EKS_V3, "version = 3\n" + text), MAIN, CERTS, V2_1)
    assert finding.passed, finding
    assert f"read as a list: {reason} in /etc/containerd/conf.d/1.toml makes" in finding.text


def test_version_2_places_of_the_settings_that_make_containerd_pull_locally():
    annotations = LIST_V2.replace(
        "discard_unpacked_layers = false",
        "discard_unpacked_layers = false\n  disable_snapshot_annotations = false",
    )
    assert check_config_path(files(annotations), MAIN, CERTS, V2_1).passed
    downloads = LIST_V2 + '[plugins."io.containerd.grpc.v1.cri"]\n  max_concurrent_downloads = 3\n'
    assert not check_config_path(files(downloads), MAIN, CERTS, V2_1).passed, "3 is the default"
    assert check_config_path(files(downloads.replace("= 3", "= 6")), MAIN, CERTS, V2_1).passed


def test_discard_unpacked_layers_hides_the_problem_until_it_is_turned_off():
    """EKS's setup (containerd#12415): discard on makes containerd pull locally; turning it
    off, as this node needs, sends pulls through the transfer service."""
    eks = EKS_V3.replace("discard_unpacked_layers = false", "discard_unpacked_layers = true")
    finding = check_config_path(files(eks), MAIN, CERTS, V2_1)
    assert not finding.passed
    assert finding.text.endswith(
        f"(today discard_unpacked_layers = true in {MAIN} makes containerd pull without the "
        "transfer service, but this node needs it off to have layers to serve)"
    )
    assert not check_discard(files(eks), MAIN, V2_1).passed


def test_without_a_running_containerd_a_version_3_config_is_taken_for_2_1_or_later():
    finding = check_config_path(files(EKS_V3), MAIN, CERTS, None)
    assert not finding.passed and "but containerd 2.1 and later pulls through" in finding.text
    assert check_config_path(files(LIST_V2), MAIN, CERTS, None).passed, "may be containerd 1.x"


def test_a_later_import_can_take_use_local_image_pull_back():
    main = EKS_V3.replace("  snapshotter", "  use_local_image_pull = true\n  snapshotter")
    drop_in = "version = 3\n" + LOCAL_PULL_V3.replace("= true", "= false")
    assert check_config_path(files(main), MAIN, CERTS, V2_1).passed
    assert not check_config_path(files(main, drop_in), MAIN, CERTS, V2_1).passed


# config_path in imports

CONFIG_PATH_DROP_IN = f'version = 2\n{V2_TABLE}\n  config_path = "{CERTS}"\n'
SNAPSHOTTER_DROP_IN = 'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  x = 1\n'


def test_config_path_set_in_an_import_is_found_and_named():
    finding = check_config_path(files(DEBIAN_DEFAULT, CONFIG_PATH_DROP_IN), MAIN, CERTS, V1_6)
    assert finding == Finding(True, f'config_path = "{CERTS}" (/etc/containerd/conf.d/1.toml)')


def test_containerd_1_drops_config_path_when_an_import_replaces_the_cri_section():
    """containerd 1.x merges imports plugin by plugin: the import's CRI section wins whole."""
    loaded = files(GOOD_V2, SNAPSHOTTER_DROP_IN)
    finding = check_config_path(loaded, MAIN, CERTS, V1_6)
    assert not finding.passed
    assert finding.text.startswith(f"config_path is not set in {MAIN} or its imports")
    assert check_config_path(loaded, MAIN, CERTS, V2_1).passed, "2.x merges key by key"


def test_a_later_import_overrides_config_path():
    elsewhere = CONFIG_PATH_DROP_IN.replace(CERTS, "/srv/certs.d")
    finding = check_config_path(files(GOOD_V2, elsewhere), MAIN, CERTS, V2_1)
    assert not finding.passed and "(/etc/containerd/conf.d/1.toml)" in finding.text


def test_an_import_without_version_is_read_with_the_main_files():
    drop_in = CONFIG_PATH_DROP_IN.replace("version = 2\n", "")
    assert check_config_path(files(DEBIAN_DEFAULT, drop_in), MAIN, CERTS, V1_6).passed


# discard_unpacked_layers


def test_discard_unpacked_layers_on_names_file_and_table():
    v2 = check_discard(files(DISCARD_V2), MAIN, V1_6)
    assert str(v2).startswith(
        f"FAIL  discard_unpacked_layers = true in {MAIN}: set it to false under "
        '[plugins."io.containerd.grpc.v1.cri".containerd] and restart containerd'
    )
    v3 = check_discard(files(DISCARD_V3), MAIN, V2_1)
    assert not v3.passed and 'under [plugins."io.containerd.cri.v1.images"] and' in v3.text


@pytest.mark.parametrize(
    ("loaded", "text"),
    [
        (files(GOOD_V2), f"discard_unpacked_layers = false ({MAIN})"),
        (files(GOOD_V3), f"discard_unpacked_layers = false ({MAIN})"),
        (files(DEBIAN_DEFAULT), f"discard_unpacked_layers is off (unset in {MAIN})"),
        ([], f"discard_unpacked_layers is off (containerd's default: no {MAIN})"),
    ],
)
def test_discard_unpacked_layers_off_is_ok(loaded, text):
    assert check_discard(loaded, MAIN, V1_6) == Finding(True, text)


def test_discard_unpacked_layers_turned_on_in_an_import():
    finding = check_discard(files(GOOD_V2, DISCARD_V2), MAIN, V1_6)
    assert not finding.passed and "= true in /etc/containerd/conf.d/1.toml" in finding.text


def test_discard_unpacked_layers_not_a_boolean():
    text = DISCARD_V2.replace("= true", '= "no"')
    assert "discard_unpacked_layers = 'no' in" in check_discard(files(text), MAIN, V1_6).text


# parsing and loading config files


def test_config_text_containerd_would_refuse():
    with pytest.raises(ValueError, match="is not valid TOML"):
        parse_config_file(MAIN, "version = 2\n[plugins\n")
    with pytest.raises(ValueError, match="version = 4 is not 1, 2 or 3"):
        parse_config_file(MAIN, "version = 4\n")


def test_imports_resolve_against_the_importing_file():
    assert import_patterns(MAIN, ["conf.d/*.toml", "/opt/x.toml", "../y.toml"]) == [
        "/etc/containerd/conf.d/*.toml",
        "/opt/x.toml",
        "/etc/y.toml",
    ]
    with pytest.raises(ValueError, match="imports must be a list"):
        import_patterns(MAIN, "conf.d/*.toml")


def test_load_follows_imports_and_globs_in_order(tmp_path: Path):
    main = tmp_path / "config.toml"
    main.write_text('version = 2\nimports = ["conf.d/*.toml", "config.toml"]\n')
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "20-b.toml").write_text("version = 2\n")
    (tmp_path / "conf.d" / "10-a.toml").write_text('version = 2\nimports = ["20-b.toml"]\n')
    loaded = [Path(f.path).name for f in load_containerd_config(main)]
    assert loaded == ["config.toml", "10-a.toml", "20-b.toml"]
    assert load_containerd_config(tmp_path / "absent.toml") == []
    main.write_text('version = 2\nimports = ["missing.toml"]\n')
    with pytest.raises(ValueError, match=r"missing\.toml is imported but missing"):
        load_containerd_config(main)


# hosts.toml


def test_what_spegel_tx_configuration_writes_passes():
    for registry in (
        MirroredRegistry("docker.io", "https://registry-1.docker.io"),
        MirroredRegistry("_default", None),
    ):
        text = render_hosts_toml(registry, ["http://127.0.0.1:5000"], resolve_tags=True)
        review = review_hosts_toml(text)
        assert review.problems == ()
        assert review.hosts[0] == "http://127.0.0.1:5000 (pull, resolve)"
    assert review.hosts[-1] == "the registry itself"


def test_a_host_without_scheme_is_tried_over_https():
    review = review_hosts_toml('[host."127.0.0.1:5000"]\n  capabilities = ["pull"]\n')
    assert review.problems == (
        'host "127.0.0.1:5000" has no scheme: containerd tries https://127.0.0.1:5000, and '
        "when that fails falls back to the upstream without a word; write "
        '[host."http://127.0.0.1:5000"]',
    )


def test_a_server_without_scheme():
    review = review_hosts_toml('server = "registry-1.docker.io"\n[host."http://m:5000"]\n')
    [problem] = review.problems
    assert problem.startswith('server = "registry-1.docker.io" has no scheme')
    assert problem.endswith('write server = "https://registry-1.docker.io"')


def test_a_file_without_host_table_is_ignored_by_containerd_1_6():
    review = review_hosts_toml('server = "https://registry-1.docker.io"\n')
    assert review.problems == ('no [host."..."] table: containerd 1.6 ignores the whole file',)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[host."http://m"\n', "not valid TOML"),
        ('host = "http://m"\n', "host must hold only tables"),
        ('[host."http://m"]\n  capabilities = ["pull", "fetch"]\n', "unknown capability fetch"),
        ('[host."http://m"]\n  capabilities = "pull"\n', "capabilities must be a list"),
        ('[host."http://m"]\n  skip_verify = "yes"\n', "skip_verify must be true or false"),
        ('[host."http://m"]\n  override_path = 1\n', "override_path must be true or false"),
        ('[host."http://m"]\n  ca = 3\n', "ca must be a path"),
        ('[host."http://m"]\n  client = [["a", "b", "c"]]\n', "client must be a path"),
        ('[host."http://m".header]\n  x = 1\n', "header must be a table of strings"),
        ('[host."http://m"]\n  dial_timeout = "soon"\n', "dial_timeout 'soon' is not"),
        ('server = 1\n[host."http://m"]\n', "server must be a string"),
        ('capabilities = ["pul"]\n[host."http://m"]\n', "the top level: unknown capability"),
    ],
)
def test_what_makes_containerd_ignore_a_file(text, problem):
    [found] = review_hosts_toml(text).problems
    assert problem in found
    assert found.endswith("containerd ignores the whole file")


def test_valid_host_table_values_pass():
    text = """\
server = "https://registry.example"
[host."https://m.example"]
  capabilities = ["Pull", "RESOLVE", "push"]
  ca = ["ca.pem"]
  client = ["both.pem", ["c.cert", "c.key"]]
  skip_verify = true
  override_path = false
  dial_timeout = "1m30s"
  [host."https://m.example".header]
    x-a = "1"
    x-b = ["2", "3"]
[host."http://other"]
"""
    review = review_hosts_toml(text)
    assert review.problems == ()
    assert review.hosts == (
        "https://m.example (pull, resolve, push)",
        "http://other (pull, resolve, push)",
        "https://registry.example",
    )


def test_no_host_with_pull_capability_sends_no_pull_to_a_mirror():
    review = review_hosts_toml('[host."http://m"]\n  capabilities = ["resolve"]\n')
    assert review.problems == ('no [host."..."] has the pull capability: no pull goes to a mirror',)


def test_hosts_files_expected_missing_broken_and_others(tmp_path: Path):
    good = render_hosts_toml(
        MirroredRegistry("_default", None), ["http://n:5000"], resolve_tags=True
    )
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text(good)
    (tmp_path / "registry.internal").mkdir()
    (tmp_path / "registry.internal" / "hosts.toml").write_text('[host."mirror:5000"]\n')
    (tmp_path / "_backup" / "docker.io").mkdir(parents=True)
    (tmp_path / "_backup" / "docker.io" / "hosts.toml").write_text("not toml [")
    findings = check_hosts_files(tmp_path, ["_default", "ghcr.io"], "http://n:5000")
    assert [(f.passed, f.text.split(": ")[0]) for f in findings] == [
        (True, f"{tmp_path}/_default/hosts.toml"),
        (False, f"no {tmp_path}/ghcr.io/hosts.toml"),
        (False, f"{tmp_path}/registry.internal/hosts.toml"),
    ], "_backup holds the operator's own files, which containerd never reads"
    assert findings[0].text.endswith(
        "tries http://n:5000 (pull, resolve), then the registry itself"
    )
    assert "containerd pulls ghcr.io without the mirror" in findings[1].text
    assert 'host "mirror:5000" has no scheme' in findings[2].text
    assert findings[1].text.endswith(
        f"run spegel-tx configuration --containerd-registry-config-path {tmp_path} "
        "--mirror-targets http://n:5000"
    )
    assert check_hosts_files(tmp_path / "absent", ["_default"], "http://n:5000") == [
        Finding(
            False,
            f"no directory {tmp_path}/absent: run spegel-tx configuration "
            f"--containerd-registry-config-path {tmp_path}/absent --mirror-targets http://n:5000",
        )
    ]


def test_another_registrys_file_shadows_default(tmp_path: Path):
    (tmp_path / "docker.io").mkdir()
    (tmp_path / "docker.io" / "hosts.toml").write_text('[host."https://corp"]\n')
    [_, other] = check_hosts_files(tmp_path, ["_default"], "http://n:5000")
    assert other.passed and other.text.endswith(
        "(not ours: docker.io pulls use it instead of _default)"
    )


# network details


def test_peers_leave_out_doctors_that_pinged_the_node():
    peer = {"node_id": "ab" * 32, "host": "10.0.0.2", "port": 5001}
    doctor = {"node_id": DOCTOR_ID.hex(), "host": "127.0.0.1", "port": 40000}
    assert real_peers(json.dumps({"peers": [doctor, peer]}).encode()) == [peer]
    assert real_peers(json.dumps({"peers": [doctor]}).encode()) == []
    assert real_peers(b'{"peers": 3}') is None
    assert real_peers(b"<html>") is None


@pytest.mark.parametrize(
    ("host", "expected"),
    [("", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("::", "::1"), ("10.0.0.5", "10.0.0.5")],
)
def test_a_wildcard_listening_address_is_reached_on_loopback(host, expected):
    assert connect_address(Address(host, 5000)) == Address(expected, 5000)


def test_no_peers_advice_names_the_bootstrap_and_the_udp_port():
    lonely = load_config(environ={})
    assert "static-bootstrap-peers is empty" in no_peers_advice(lonely)
    dns = load_config(environ={"BOOTSTRAP_KIND": "dns", "ROUTER_ADDR": ":5003"})
    assert no_peers_advice(dns) == (
        "no peers: check bootstrap (static-bootstrap-peers / dns-bootstrap-domain) and that "
        "UDP 5003 is open between nodes"
    )


@pytest.mark.parametrize("secret", [None, b"s" * 16])
def test_ping_datagram_and_its_pong(secret):
    txid = b"12345678"
    ping = decode(ping_datagram(txid, secret, ("127.0.0.1", 40000)), secret)
    assert isinstance(ping.body, Ping) and ping.header.txid == txid
    assert ping.header.sender_id == DOCTOR_ID
    if secret is not None:
        assert ping.binding == Binding(NO_RECEIVER, "127.0.0.1", 40000), "for whoever listens"
    node = b"n" * 32

    def answer(body, receiver=DOCTOR_ID, stamp=ping.header.timestamp_ms):
        binding = Binding(receiver, "127.0.0.1", 5001) if secret is not None else None
        return encode(Message(Header(txid, node, 5000, stamp), body, binding), secret)

    pong = answer(Pong())
    assert is_pong(pong, txid, secret)
    assert not is_pong(pong, b"87654321", secret), "another request's answer"
    assert not is_pong(b"garbage", txid, secret)
    assert not is_pong(answer(Ping(), stamp=0), txid, secret), "a ping is no answer"
    if secret is not None:
        assert not is_pong(pong, txid, b"t" * 16), "signed with another secret"
        assert not is_pong(answer(Pong(), receiver=node), txid, secret), "a pong for another"


def test_doctor_command_line_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    node_yaml = tmp_path / "node.yaml"
    node_yaml.write_text("registry-addr: nope\n")
    assert cli.main(["doctor", f"--config={node_yaml}"], environ={}) == 2
    assert capsys.readouterr().err == (
        "spegel-tx doctor: error: --registry-addr: 'nope' has no port; write host:port or :port\n"
    )
    flags = ["doctor", f"--containerd-config={tmp_path}", "--mirrored-registries=docker.io"]
    assert cli.main(flags, environ={}) == 2
    assert "--mirrored-registries: 'docker.io' is not an http:// or https:// URL" in (
        capsys.readouterr().err
    )
    for timeout in ("0", "-1", "soon", "inf"):
        with pytest.raises(SystemExit) as exited:
            cli.main(["doctor", f"--timeout={timeout}"], environ={})
        assert exited.value.code == 2
