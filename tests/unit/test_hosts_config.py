"""hosts.toml rendering as plain functions; apply and cleanup on a temporary directory."""

from __future__ import annotations

import os
import shutil
import stat
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spegel_tx import cli
from spegel_tx.containerd.hostsconfig import (
    MirroredRegistry,
    apply_configuration,
    cleanup_configuration,
    parse_existing_hosts,
    parse_mirror_targets,
    parse_mirrored_registries,
    render_hosts_toml,
)
from spegel_tx.errors import ConfigError

MIRROR = "http://127.0.0.1:5000"
DOCKER_HUB = MirroredRegistry("docker.io", "https://registry-1.docker.io")
DEFAULT = MirroredRegistry("_default", None)

EXISTING_DOCKER_HUB = """\
server = "https://registry-1.docker.io"
# The operator's own mirror, with a client certificate beside this file.
[host."https://corp-mirror.example:8443"]
  capabilities = ["pull", "resolve"]
  client = [["client.cert", "client.key"]]
  skip_verify = false
  [host."https://corp-mirror.example:8443".header]
    x-custom = ["a", "b"]

[host]

[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve", "push"]

[host."https://second.example"]
  capabilities = ["pull"]
  override_path = true
"""


# --- rendering ---------------------------------------------------------------------------


def test_docker_hub_is_served_by_registry_1():
    text = render_hosts_toml(DOCKER_HUB, [MIRROR], resolve_tags=True)
    assert text == (
        'server = "https://registry-1.docker.io"\n'
        "\n"
        '[host."http://127.0.0.1:5000"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        '  dial_timeout = "200ms"\n'
    )
    assert tomllib.loads(text) == {
        "server": "https://registry-1.docker.io",
        "host": {MIRROR: {"capabilities": ["pull", "resolve"], "dial_timeout": "200ms"}},
    }


def test_default_has_no_server_so_each_registry_keeps_its_own():
    text = render_hosts_toml(DEFAULT, [MIRROR], resolve_tags=True)
    assert text.startswith('[host."http://127.0.0.1:5000"]\n')
    assert "server" not in tomllib.loads(text)


def test_without_tag_resolution_the_mirror_may_only_pull():
    text = render_hosts_toml(DOCKER_HUB, [MIRROR], resolve_tags=False)
    assert tomllib.loads(text)["host"][MIRROR]["capabilities"] == ["pull"]


def test_mirrors_are_listed_in_the_order_given():
    targets = ["http://127.0.0.1:5000", "http://[fd00::1]:5000", "https://10.0.0.1:5443"]
    text = render_hosts_toml(DOCKER_HUB, targets, resolve_tags=True)
    assert list(tomllib.loads(text)["host"]) == targets


def test_an_ipv6_mirror_is_written_as_containerd_1_6_reads_it():
    """containerd 1.6 ends a table header at the first "]", quotes or not: it rejects
    [host."http://[fd00::1]:5000"] and ignores the file (seen with ctr in an IPv6-only
    network namespace, tests/integration/test_ip_networks.py). No header may hold one."""
    existing = parse_existing_hosts(EXISTING_DOCKER_HUB)
    targets = ["http://[fd00::1]:30020", "http://127.0.0.1:5000"]
    text = render_hosts_toml(DOCKER_HUB, targets, resolve_tags=True, existing_hosts=existing)
    headers = [line for line in text.splitlines() if line.startswith("[")]
    assert headers == ["[host]"]
    hosts = tomllib.loads(text)["host"]
    assert list(hosts) == [*targets, "https://corp-mirror.example:8443", "https://second.example"]
    assert hosts["http://[fd00::1]:30020"]["capabilities"] == ["pull", "resolve"]
    assert hosts["https://corp-mirror.example:8443"] == existing["https://corp-mirror.example:8443"]


def test_existing_hosts_follow_ours_and_a_duplicate_of_ours_is_dropped():
    existing = parse_existing_hosts(EXISTING_DOCKER_HUB)
    text = render_hosts_toml(DOCKER_HUB, [MIRROR], resolve_tags=True, existing_hosts=existing)
    hosts = tomllib.loads(text)["host"]
    assert list(hosts) == [MIRROR, "https://corp-mirror.example:8443", "https://second.example"]
    assert hosts[MIRROR] == {"capabilities": ["pull", "resolve"], "dial_timeout": "200ms"}
    assert hosts["https://corp-mirror.example:8443"] == {
        "capabilities": ["pull", "resolve"],
        "client": [["client.cert", "client.key"]],
        "skip_verify": False,
        "header": {"x-custom": ["a", "b"]},
    }
    assert hosts["https://second.example"] == {"capabilities": ["pull"], "override_path": True}


scalars = st.one_of(
    st.text(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.datetimes(),
    st.dates(),
    st.times(),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner)
)
tables = st.recursive(
    st.dictionaries(st.text(), values, max_size=4),
    lambda inner: st.dictionaries(st.text(), values | inner, max_size=4),
    max_leaves=8,
)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text(min_size=1), tables, max_size=3))
def test_any_existing_hosts_are_written_back_as_they_were_read(existing):
    text = render_hosts_toml(DEFAULT, [MIRROR], resolve_tags=True, existing_hosts=existing)
    hosts = tomllib.loads(text)["host"]
    assert hosts.pop(MIRROR) == {"capabilities": ["pull", "resolve"], "dial_timeout": "200ms"}
    assert hosts == {host: table for host, table in existing.items() if host != MIRROR}


def test_existing_hosts_are_read_only_from_valid_host_tables():
    assert parse_existing_hosts('server = "https://ghcr.io"\n') == {}
    with pytest.raises(ValueError, match="not valid TOML"):
        parse_existing_hosts("[host.'x'\n")
    with pytest.raises(ValueError, match="only tables"):
        parse_existing_hosts('host = "https://mirror"\n')
    with pytest.raises(ValueError, match="only tables"):
        parse_existing_hosts('[host]\n"https://mirror" = 1\n')


# --- parsing the flags' values ------------------------------------------------------------


def test_no_mirrored_registry_or_a_wildcard_means_default():
    assert parse_mirrored_registries([]) == [DEFAULT]
    assert parse_mirrored_registries(["_default"]) == [DEFAULT]
    assert parse_mirrored_registries(["*", "_default"]) == [DEFAULT]


def test_mirrored_registries_keep_their_order_scheme_and_port():
    assert parse_mirrored_registries(
        ["https://docker.io", "http://127.0.0.1:15000", "https://ghcr.io", "https://docker.io"]
    ) == [
        DOCKER_HUB,
        MirroredRegistry("127.0.0.1:15000", "http://127.0.0.1:15000"),
        MirroredRegistry("ghcr.io", "https://ghcr.io"),
    ]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("docker.io", "is not an http:// or https:// URL"),
        ("ftp://docker.io", "is not an http:// or https:// URL"),
        ("https://", "is not an http:// or https:// URL"),
        ("https://docker.io/library", "with nothing after it"),
        ("https://docker.io?x=1", "with nothing after it"),
        ("https://user:pw@docker.io", "with nothing after it"),
        ("https://docker.io:http", "invalid port"),
        ("https://_backup", "reserved name"),
    ],
)
def test_a_bad_mirrored_registry_names_the_flag(value, problem):
    with pytest.raises(ConfigError, match=problem) as caught:
        parse_mirrored_registries([value])
    assert caught.value.key == "mirrored-registries"


def test_one_registry_with_two_schemes_is_refused():
    with pytest.raises(ConfigError, match=r"ghcr\.io is named twice"):
        parse_mirrored_registries(["https://ghcr.io", "http://ghcr.io"])


def test_mirror_targets_are_required_deduplicated_and_get_ipv6_brackets():
    assert parse_mirror_targets([MIRROR, "http://fd00::1:5000", MIRROR]) == [
        MIRROR,
        "http://[fd00::1]:5000",
    ]
    for bad in ([], ["_default"], ["127.0.0.1:5000"]):
        with pytest.raises(ConfigError) as caught:
            parse_mirror_targets(bad)
        assert caught.value.key == "mirror-targets"


# --- apply and cleanup on disk ------------------------------------------------------------


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root``: a file's bytes and mode, a link's target, or "dir"."""
    tree: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            tree[name] = ("link", os.readlink(path))
        elif path.is_dir():
            tree[name] = "dir"
        else:
            tree[name] = (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
    return tree


def apply(path: Path, registries: list[str], prepend: bool = False, resolve: bool = True):
    return apply_configuration(
        path,
        parse_mirrored_registries(registries),
        [MIRROR],
        resolve_tags=resolve,
        prepend_existing=prepend,
    )


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """An operator's certs.d: Docker Hub with a key beside it, an unrelated registry, a link."""
    root = tmp_path / "certs.d"
    (root / "docker.io" / "certs").mkdir(parents=True)
    (root / "docker.io" / "hosts.toml").write_text(EXISTING_DOCKER_HUB)
    (root / "docker.io" / "client.cert").write_text("CERT")
    (root / "docker.io" / "client.key").write_text("KEY")
    (root / "docker.io" / "client.key").chmod(0o600)
    (root / "docker.io" / "certs" / "ca.pem").write_text("CA")
    (root / "registry.internal:5000").mkdir()
    (root / "registry.internal:5000" / "hosts.toml").write_text(
        'server = "https://registry.internal:5000"\n[host."https://registry.internal:5000"]\n'
        '  ca = "/etc/pki/internal.pem"\n'
    )
    (root / "quay.io").symlink_to("registry.internal:5000")
    (root / "README").write_text("notes")
    return root


def test_first_apply_backs_up_everything_and_leaves_only_ours(certs):
    before = snapshot(certs)
    written = apply(certs, ["https://docker.io", "https://ghcr.io"])
    assert written == [certs / "docker.io" / "hosts.toml", certs / "ghcr.io" / "hosts.toml"]
    assert sorted(p.name for p in certs.iterdir()) == ["_backup", "docker.io", "ghcr.io"]
    assert snapshot(certs / "_backup") == before
    assert sorted(p.name for p in (certs / "docker.io").iterdir()) == ["hosts.toml"]
    hub = tomllib.loads((certs / "docker.io" / "hosts.toml").read_text())
    assert hub["server"] == "https://registry-1.docker.io"
    assert list(hub["host"]) == [MIRROR]
    ghcr = tomllib.loads((certs / "ghcr.io" / "hosts.toml").read_text())
    assert ghcr["server"] == "https://ghcr.io"


def test_cleanup_restores_exactly_what_was_there_and_removes_the_backup(certs):
    before = snapshot(certs)
    apply(certs, ["https://docker.io"], prepend=True)
    assert cleanup_configuration(certs) is True
    assert snapshot(certs) == before


def test_running_twice_changes_nothing_and_keeps_the_first_backup(certs):
    before = snapshot(certs)
    apply(certs, [], prepend=True)
    after_first = snapshot(certs)
    apply(certs, [], prepend=True)
    assert snapshot(certs) == after_first
    assert snapshot(certs / "_backup") == before
    assert cleanup_configuration(certs) is True
    assert cleanup_configuration(certs) is False
    assert snapshot(certs) == before


def test_a_later_apply_replaces_the_earlier_one_but_not_the_backup(certs):
    before = snapshot(certs)
    apply(certs, ["https://docker.io", "https://ghcr.io"], prepend=True)
    apply(certs, ["https://ghcr.io"], resolve=False)
    assert sorted(p.name for p in certs.iterdir()) == ["_backup", "ghcr.io"]
    ghcr = tomllib.loads((certs / "ghcr.io" / "hosts.toml").read_text())
    assert ghcr["host"][MIRROR]["capabilities"] == ["pull"]
    assert snapshot(certs / "_backup") == before
    cleanup_configuration(certs)
    assert snapshot(certs) == before


def test_prepend_existing_keeps_the_hosts_after_ours_and_the_files_they_name(certs):
    apply(certs, ["https://docker.io"], prepend=True)
    hub = certs / "docker.io"
    hosts = tomllib.loads((hub / "hosts.toml").read_text())["host"]
    assert list(hosts) == [MIRROR, "https://corp-mirror.example:8443", "https://second.example"]
    assert hosts[MIRROR]["dial_timeout"] == "200ms"
    assert (hub / "client.cert").read_text() == "CERT"
    assert (hub / "certs" / "ca.pem").read_text() == "CA"
    assert stat.S_IMODE((hub / "client.key").stat().st_mode) == 0o600

    apply(certs, ["https://docker.io"], prepend=False)
    assert sorted(p.name for p in hub.iterdir()) == ["hosts.toml"]
    assert list(tomllib.loads((hub / "hosts.toml").read_text())["host"]) == [MIRROR]


def test_prepend_existing_for_a_registry_without_hosts_writes_only_ours(certs):
    apply(certs, ["https://ghcr.io", "_default"], prepend=True)
    assert sorted(p.name for p in (certs / "ghcr.io").iterdir()) == ["hosts.toml"]
    assert list(tomllib.loads((certs / "_default" / "hosts.toml").read_text())) == ["host"]


def test_prepend_existing_refuses_a_broken_existing_file_before_changing_anything(certs):
    (certs / "docker.io" / "hosts.toml").write_text("[host.'x'\n")
    before = snapshot(certs)
    with pytest.raises(ValueError, match=r"certs\.d/docker\.io/hosts\.toml: not valid TOML"):
        apply(certs, ["https://docker.io"], prepend=True)
    assert snapshot(certs) == before
    apply(certs, ["https://docker.io"], prepend=False)
    with pytest.raises(ValueError, match=r"_backup/docker\.io/hosts\.toml: not valid TOML"):
        apply(certs, ["https://docker.io"], prepend=True)


def test_a_missing_directory_is_created_and_cleanup_leaves_it_empty(tmp_path):
    certs = tmp_path / "etc" / "containerd" / "certs.d"
    apply(certs, [])
    assert snapshot(certs) == {
        "_backup": "dir",
        "_default": "dir",
        "_default/hosts.toml": (
            render_hosts_toml(DEFAULT, [MIRROR], resolve_tags=True).encode(),
            0o644,
        ),
    }
    assert cleanup_configuration(certs) is True
    assert snapshot(certs) == {}


def test_cleanup_without_a_backup_touches_nothing(certs, tmp_path):
    before = snapshot(certs)
    assert cleanup_configuration(certs) is False
    assert cleanup_configuration(tmp_path / "absent") is False
    assert snapshot(certs) == before


def test_writes_leave_no_temporary_file_and_stale_ones_are_removed(certs):
    apply(certs, ["https://docker.io"])
    (certs / "docker.io" / ".hosts.toml.crashed").write_text("half")
    apply(certs, ["https://docker.io"])
    assert sorted(p.name for p in (certs / "docker.io").iterdir()) == ["hosts.toml"]


def test_an_interrupted_backup_is_finished_by_the_next_apply(certs):
    before = snapshot(certs)
    partial = certs / "_backup.partial"
    partial.mkdir()
    (certs / "docker.io").rename(partial / "docker.io")
    (certs / "README").rename(partial / "README")
    apply(certs, ["https://docker.io"], prepend=True)
    assert snapshot(certs / "_backup") == before
    hosts = tomllib.loads((certs / "docker.io" / "hosts.toml").read_text())["host"]
    assert "https://corp-mirror.example:8443" in hosts
    cleanup_configuration(certs)
    assert snapshot(certs) == before


def test_an_interrupted_backup_is_undone_by_cleanup(certs):
    before = snapshot(certs)
    partial = certs / "_backup.partial"
    partial.mkdir()
    (certs / "docker.io").rename(partial / "docker.io")
    assert cleanup_configuration(certs) is True
    assert snapshot(certs) == before


@pytest.mark.parametrize("then_apply", [False, True])
def test_an_interrupted_restore_is_finished_first(certs, then_apply):
    before = snapshot(certs)
    apply(certs, ["https://docker.io"])
    # Cleanup stopped after renaming _backup and moving one entry back.
    for entry in certs.iterdir():
        if entry.name != "_backup":
            shutil.rmtree(entry)
    (certs / "_backup").rename(certs / "_backup.restoring")
    (certs / "_backup.restoring" / "docker.io").rename(certs / "docker.io")
    if then_apply:
        apply(certs, ["https://docker.io"])
        assert snapshot(certs / "_backup") == before
    cleanup_configuration(certs)
    assert snapshot(certs) == before


# --- command line (in process) ------------------------------------------------------------


def run_cli(tmp_path: Path, *args: str, environ: dict[str, str] | None = None) -> int:
    flags = ["--containerd-registry-config-path", str(tmp_path / "certs.d")]
    return cli.main(["configuration", *flags, *args], environ or {})


def written_hosts(tmp_path: Path) -> dict[str, dict]:
    root = tmp_path / "certs.d"
    return {p.parent.name: tomllib.loads(p.read_text()) for p in root.glob("*/hosts.toml")}


def test_spegels_helm_chart_arguments_are_accepted(tmp_path, capsys):
    code = run_cli(
        tmp_path,
        "--log-level=INFO",
        "--mirrored-registries",
        "https://docker.io",
        "https://ghcr.io",
        "--mirrored-registries=https://quay.io",
        "--mirror-targets",
        "http://10.0.0.7:30020",
        MIRROR,
        "--resolve-tags=false",
        "--prepend-existing=false",
    )
    assert code == 0
    hosts = written_hosts(tmp_path)
    assert sorted(hosts) == ["docker.io", "ghcr.io", "quay.io"]
    assert list(hosts["quay.io"]["host"]) == ["http://10.0.0.7:30020", MIRROR]
    assert hosts["quay.io"]["host"][MIRROR]["capabilities"] == ["pull"]
    assert capsys.readouterr().out.count("wrote ") == 3


def test_two_urls_in_one_flag_value_are_refused_as_spegel_reads_them(tmp_path, capsys):
    """A flag value is one item, as in Spegel (and as the daemon's flags); the environment
    variable is the comma-separated form."""
    joined = "https://ghcr.io,https://quay.io"
    assert run_cli(tmp_path, "--mirrored-registries", joined, "--mirror-targets", MIRROR) == 2
    assert capsys.readouterr().err == (
        f"spegel-tx configuration: error: --mirrored-registries: '{joined}' is more than one "
        "URL: give each as its own value\n"
    )


@pytest.mark.parametrize(
    ("args", "capabilities"),
    [
        ((), ["pull", "resolve"]),
        (("--resolve-tags",), ["pull", "resolve"]),
        (("--resolve-tags", "false"), ["pull"]),
        (("--resolve-tags=F",), ["pull"]),
    ],
)
def test_resolve_tags_is_a_go_style_boolean(tmp_path, args, capabilities):
    assert run_cli(tmp_path, "--mirror-targets", MIRROR, *args) == 0
    assert written_hosts(tmp_path)["_default"]["host"][MIRROR]["capabilities"] == capabilities


def test_spegels_environment_variables_apply_and_flags_win(tmp_path, capsys):
    environ = {
        "MIRRORED_REGISTRIES": "https://docker.io,https://ghcr.io",
        "MIRROR_TARGETS": "http://127.0.0.9:5000",
        "RESOLVE_TAGS": "false",
        "LOG_LEVEL": "WARN",
    }
    assert run_cli(tmp_path, environ=environ) == 0
    hosts = written_hosts(tmp_path)
    assert sorted(hosts) == ["docker.io", "ghcr.io"]
    assert hosts["ghcr.io"]["host"]["http://127.0.0.9:5000"]["capabilities"] == ["pull"]
    assert capsys.readouterr().out == ""
    assert run_cli(tmp_path, "--mirror-targets", MIRROR, "--resolve-tags", environ=environ) == 0
    assert written_hosts(tmp_path)["ghcr.io"]["host"][MIRROR]["capabilities"] == ["pull", "resolve"]


@pytest.mark.parametrize(
    ("args", "environ", "message"),
    [
        (
            ["--mirrored-registries", "docker.io", "--mirror-targets", MIRROR],
            {},
            "spegel-tx configuration: error: --mirrored-registries: 'docker.io' is not an "
            "http:// or https:// URL such as https://docker.io",
        ),
        (
            [],
            {},
            "spegel-tx configuration: error: --mirror-targets: at least one is required, "
            "such as http://127.0.0.1:5000",
        ),
        (
            ["--mirror-targets", MIRROR],
            {"PREPEND_EXISTING": "sometimes"},
            "spegel-tx configuration: error: --prepend-existing: 'sometimes' is not true or "
            "false (from PREPEND_EXISTING)",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(tmp_path, capsys, args, environ, message):
    assert run_cli(tmp_path, *args, environ=environ) == 2
    assert capsys.readouterr().err.splitlines() == [message]
    assert not (tmp_path / "certs.d").exists()


def test_an_empty_directory_flag_is_refused_rather_than_meaning_here(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["cleanup", "--containerd-registry-config-path="], {})
    assert exited.value.code == 2
    assert "--containerd-registry-config-path: an empty path" in capsys.readouterr().err


# --- basic authentication ----------------------------------------------------------------


def test_the_credentials_go_to_every_mirror_of_ours_as_an_authorization_header():
    text = render_hosts_toml(
        DOCKER_HUB,
        [MIRROR, "http://[fd00::7]:30020"],
        resolve_tags=True,
        existing_hosts=parse_existing_hosts(EXISTING_DOCKER_HUB),
        authorization="Basic c3BlZ2VsOnMzY3JldA==",
    )
    hosts = tomllib.loads(text)["host"]
    for ours in (MIRROR, "http://[fd00::7]:30020"):
        assert hosts[ours]["header"] == {"Authorization": "Basic c3BlZ2VsOnMzY3JldA=="}
    assert hosts["https://corp-mirror.example:8443"]["header"] == {"x-custom": ["a", "b"]}
    assert "header" not in hosts["https://second.example"], "never sent to another host"


def test_the_configuration_command_writes_the_secrets_credentials_for_the_owner_only(
    tmp_path, capsys
):
    (tmp_path / "username").write_text("spegel\n")
    (tmp_path / "password").write_text("s3cret")
    files = [
        f"--basic-auth-username-file={tmp_path / 'username'}",
        f"--basic-auth-password-file={tmp_path / 'password'}",
    ]
    assert run_cli(tmp_path, "--mirror-targets", MIRROR, *files) == 0
    written = tmp_path / "certs.d" / "_default" / "hosts.toml"
    header = tomllib.loads(written.read_text())["host"][MIRROR]["header"]
    assert header == {"Authorization": "Basic c3BlZ2VsOnMzY3JldA=="}
    assert stat.S_IMODE(written.stat().st_mode) == 0o600, "it holds a credential"
    assert run_cli(tmp_path, "--mirror-targets", MIRROR) == 0
    assert "header" not in written_hosts(tmp_path)["_default"]["host"][MIRROR]
    assert stat.S_IMODE(written.stat().st_mode) == 0o644


def test_a_credential_file_that_is_not_there_stops_the_configuration(tmp_path, capsys):
    environ = {"BASIC_AUTH_PASSWORD_FILE": str(tmp_path / "missing")}
    assert run_cli(tmp_path, "--mirror-targets", MIRROR, environ=environ) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("spegel-tx configuration: error: --basic-auth-password-file: ")
    assert not (tmp_path / "certs.d").exists()
