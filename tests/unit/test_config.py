import re

import pytest

from spegel_tx.config import (
    Address,
    Config,
    format_size,
    load_config,
    parse_address,
    parse_duration,
)
from spegel_tx.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_spegels():
    config = load_config(None, environ={})
    assert config == Config()
    assert config.registry_addr == Address("", 5000)
    assert config.router_addr == Address("", 5001)
    assert config.mirror_resolve_timeout == pytest.approx(0.020)
    assert config.containerd_namespace == "k8s.io"


def test_file_then_environment_then_flags(tmp_path):
    path = write(
        tmp_path,
        "registry-addr: 127.0.0.2:5000\nmirror-resolve-retries: 5\nlog-level: debug\n",
    )
    config = load_config(path, environ={"REGISTRY_ADDR": "127.0.0.3:5000"})
    assert config.registry_addr == Address("127.0.0.3", 5000)
    assert config.mirror_resolve_retries == 5
    assert config.log_level == "DEBUG"
    config = load_config(
        path,
        environ={"REGISTRY_ADDR": "127.0.0.3:5000"},
        flags={"registry-addr": "127.0.0.4:5001", "log-level": None},
    )
    assert config.registry_addr == Address("127.0.0.4", 5001)
    assert config.log_level == "DEBUG"


def test_lists_from_yaml_and_from_comma_separated_text(tmp_path):
    path = write(
        tmp_path,
        "mirrored-registries: [https://docker.io, ghcr.io]\n"
        "registry-filters: [':latest$']\n"
        "static-bootstrap-peers: ['127.0.0.2:5001', '[::1]:5001']\n",
    )
    config = load_config(path, environ={})
    assert config.mirrored_registries == ("docker.io", "ghcr.io")
    assert [p.pattern for p in config.registry_filters] == [":latest$"]
    assert config.static_bootstrap_peers == (Address("127.0.0.2", 5001), Address("::1", 5001))
    env = {"MIRRORED_REGISTRIES": "https://quay.io, registry.k8s.io"}
    assert load_config(path, environ=env).mirrored_registries == ("quay.io", "registry.k8s.io")


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("registry-adr: :5000\n", "registry-adr", "unknown key"),
        ("registry-addr: localhost\n", "registry-addr", "no port"),
        ("registry-addr: ':99999'\n", "registry-addr", "port"),
        ("mirror-resolve-timeout: 20\n", "mirror-resolve-timeout", "duration"),
        ("mirror-resolve-timeout: 20 parsecs\n", "mirror-resolve-timeout", "duration"),
        ("mirror-resolve-retries: three\n", "mirror-resolve-retries", "whole number"),
        ("debug-web-enabled: maybe\n", "debug-web-enabled", "true or false"),
        ("registry-filters: ['(']\n", "registry-filters", "regular expression"),
        ("log-level: loud\n", "log-level", "DEBUG, INFO, WARN, ERROR"),
        ("bootstrap-kind: carrier-pigeon\n", "bootstrap-kind", "static, dns"),
        ("containerd-sock: [a, b]\n", "containerd-sock", "not a string"),
        ("- just\n- a list\n", "config", "mapping"),
        ("registry-addr: [\n", "config", "not valid YAML"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key, problem):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={})
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{key}: ")


def test_bad_environment_value_names_the_key():
    with pytest.raises(ConfigError, match=r"^mirror-resolve-timeout: "):
        load_config(None, environ={"MIRROR_RESOLVE_TIMEOUT": "soon"})


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"), environ={})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20ms", 0.02), ("1m30s", 90.0), ("1.5h", 5400.0), ("0", 0.0), ("250us", 0.00025)],
)
def test_go_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "ms", "20", "1d", "-5s", "1m 30s"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "address"),
    [(":5000", Address("", 5000)), ("[::1]:80", Address("::1", 80)), ("a.b:1", Address("a.b", 1))],
)
def test_addresses(text, address):
    assert parse_address(text) == address
    assert re.fullmatch(r".*:\d+", str(address))


def test_ipv6_without_brackets_is_refused():
    with pytest.raises(ValueError, match="brackets"):
        parse_address("::1:5000")


def test_shipped_example_documents_the_defaults():
    assert load_config("deploy/examples/node.yaml", environ={}) == Config()


def test_router_secret_from_environment_or_file(tmp_path):
    from spegel_tx.config import router_secret

    secret_file = tmp_path / "secret"
    secret_file.write_text("0123456789abcdef-cluster\n")
    config = load_config(write(tmp_path, f"router-secret-file: {secret_file}\n"), environ={})
    assert router_secret(config, environ={}) == b"0123456789abcdef-cluster"
    from_env = {"ROUTER_SECRET": " from-the-environment\n"}
    assert router_secret(config, environ=from_env) == b"from-the-environment"
    assert router_secret(Config(), environ={}) is None


def test_a_secret_shorter_than_16_bytes_is_refused_from_file_or_environment(tmp_path):
    from spegel_tx.config import router_secret

    secret_file = tmp_path / "secret"
    secret_file.write_text("short\n")
    config = load_config(write(tmp_path, f"router-secret-file: {secret_file}\n"), environ={})
    with pytest.raises(ConfigError) as caught:
        router_secret(config, environ={})
    assert str(caught.value) == (
        f"router-secret-file: {secret_file} holds 5 bytes, a cluster secret needs 16 or more: "
        f"put the same longer one on every node (`head -c 32 /dev/urandom | base64 > "
        f"{secret_file}`)"
    )
    with pytest.raises(ConfigError) as caught:
        router_secret(Config(), environ={"ROUTER_SECRET": "15-bytes-secret"})
    assert str(caught.value) == (
        "ROUTER_SECRET: holds 15 bytes, a cluster secret needs 16 or more: give every node "
        "the same longer one (`head -c 32 /dev/urandom | base64` makes one)"
    )
    assert router_secret(Config(), environ={"ROUTER_SECRET": "16-bytes-secret!"})


def test_republishing_must_come_before_records_expire(tmp_path):
    with pytest.raises(ConfigError, match=r"^router-republish-interval: "):
        load_config(
            write(tmp_path, "router-record-ttl: 10m\nrouter-republish-interval: 15m\n"), environ={}
        )


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", 1 << 20), ("512KiB", 512 << 10), ("1MiB", 1 << 20), ("10MB", 10**7), (0, 0)],
)
def test_mirror_min_throughput_takes_sizes(text, size):
    assert load_config(None, {}, {"mirror-min-throughput": text}).mirror_min_throughput == size


def test_a_size_without_a_known_unit_names_the_key():
    with pytest.raises(ConfigError, match="mirror-min-throughput"):
        load_config(None, {}, {"mirror-min-throughput": "fast"})


@pytest.mark.parametrize(
    ("size", "text"), [(1 << 20, "1MiB"), (512 << 10, "512KiB"), (1000, "1000B")]
)
def test_sizes_are_written_back_in_the_largest_unit(size, text):
    assert format_size(size) == text


def test_record_limits_are_whole_numbers_the_total_at_least_one_host_s(tmp_path):
    config = load_config(
        write(tmp_path, "router-max-records: 5000\nrouter-max-records-per-host: 500\n"),
        environ={},
    )
    assert (config.router_max_records, config.router_max_records_per_host) == (5000, 500)
    with pytest.raises(ConfigError, match=r"^router-max-records: .*router-max-records-per-host"):
        load_config(environ={"ROUTER_MAX_RECORDS": "10", "ROUTER_MAX_RECORDS_PER_HOST": "20"})
    with pytest.raises(ConfigError, match=r"^router-max-records-per-host: must be at least 1"):
        load_config(environ={"ROUTER_MAX_RECORDS_PER_HOST": "0"})
    with pytest.raises(ConfigError, match=r"^router-max-records: .*whole number"):
        load_config(environ={"ROUTER_MAX_RECORDS": "lots"})
