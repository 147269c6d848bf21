"""The node's configuration: YAML file, then environment, then flags, over defaults.

Key, flag and environment names are Spegel's, so a Spegel user can carry a
configuration over unchanged. Every problem raises ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml

from spegel_tx.errors import ConfigError
from spegel_tx.routing.kademlia.limits import Limits


@dataclass(frozen=True)
class Address:
    """A listening or peer address; an empty host means every interface."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_LOG_LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")
_BOOTSTRAP_KINDS = ("static", "dns")


def parse_duration(text: str) -> float:
    """Seconds from a Go duration string such as ``20ms`` or ``1m30s``."""
    text = text.strip()
    if text == "0":
        return 0.0
    position, total = 0, 0.0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            raise ValueError(f"{text!r} is not a duration such as 20ms or 1m30s")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position == 0:
        raise ValueError("empty duration")
    return total


def parse_address(text: str) -> Address:
    """``host:port``, ``:port`` or ``[v6]:port``, as Go's net.Listen takes them."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        raise ValueError(f"{text!r} has no port; write host:port or :port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif ":" in host:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, as [::1]:5000")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return Address(host, int(port_text))


def parse_registry_host(text: str) -> str:
    """A registry named by URL (Spegel's form, ``https://docker.io``) or by host."""
    text = text.strip()
    host = urlsplit(text).netloc if "://" in text else text
    if not host or any(c in host for c in "/?# "):
        raise ValueError(f"{text!r} is not a registry URL or host")
    return host


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(f"{value!r} is not true or false")


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ValueError(f"{value!r} is not a whole number")


def _parse_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _parse_duration_value(value: Any) -> float:
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError(f"{value!r} is not a duration string such as 20ms")


def _parse_choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = _parse_str(value)
        normalised = text.upper() if choices is _LOG_LEVELS else text.lower()
        if normalised not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return normalised

    return parse


def _parse_list(item: Callable[[str], Any]) -> Callable[[Any], tuple[Any, ...]]:
    """Lists come as YAML lists, or comma-separated from flags and environment."""

    def parse(value: Any) -> tuple[Any, ...]:
        if isinstance(value, str):
            items = [part for part in (p.strip() for p in value.split(",")) if part]
        elif isinstance(value, list):
            items = [_parse_str(part) for part in value]
        else:
            raise ValueError(f"{value!r} is not a list")
        return tuple(item(part) for part in items)

    return parse


def _parse_regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as e:
        raise ValueError(f"{text!r} is not a valid regular expression: {e}") from e


def _parse_address_value(value: Any) -> Address:
    return parse_address(_parse_str(value))


@dataclass(frozen=True)
class Config:
    """Everything a node needs to start; built only through ``load_config``."""

    registry_addr: Address = Address("", 5000)
    router_addr: Address = Address("", 5001)
    metrics_addr: Address = Address("", 9090)
    containerd_sock: str = "/run/containerd/containerd.sock"
    containerd_namespace: str = "k8s.io"
    containerd_content_path: str = "/var/lib/containerd/io.containerd.content.v1.content"
    bootstrap_kind: str = "static"
    static_bootstrap_peers: tuple[Address, ...] = ()
    dns_bootstrap_domain: str = ""
    mirrored_registries: tuple[str, ...] = ()
    registry_filters: tuple[re.Pattern[str], ...] = ()
    mirror_resolve_timeout: float = 0.020
    mirror_resolve_retries: int = 3
    mirror_connect_timeout: float = 1.0
    mirror_response_timeout: float = 2.0
    mirror_idle_timeout: float = 5.0
    mirror_peer_quarantine: float = 30.0
    data_dir: str = ""
    log_level: str = "INFO"
    debug_web_enabled: bool = False
    router_secret_file: str = ""
    router_record_ttl: float = 19 * 60.0
    router_republish_interval: float = 15 * 60.0
    router_max_records: int = Limits.records
    router_max_records_per_host: int = Limits.records_per_host


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "registry-addr": _parse_address_value,
    "router-addr": _parse_address_value,
    "metrics-addr": _parse_address_value,
    "containerd-sock": _parse_str,
    "containerd-namespace": _parse_str,
    "containerd-content-path": _parse_str,
    "bootstrap-kind": _parse_choice(_BOOTSTRAP_KINDS),
    "static-bootstrap-peers": _parse_list(parse_address),
    "dns-bootstrap-domain": _parse_str,
    "mirrored-registries": _parse_list(parse_registry_host),
    "registry-filters": _parse_list(_parse_regex),
    "mirror-resolve-timeout": _parse_duration_value,
    "mirror-resolve-retries": _parse_int,
    "mirror-connect-timeout": _parse_duration_value,
    "mirror-response-timeout": _parse_duration_value,
    "mirror-idle-timeout": _parse_duration_value,
    "mirror-peer-quarantine": _parse_duration_value,
    "data-dir": _parse_str,
    "log-level": _parse_choice(_LOG_LEVELS),
    "debug-web-enabled": _parse_bool,
    "router-secret-file": _parse_str,
    "router-record-ttl": _parse_duration_value,
    "router-republish-interval": _parse_duration_value,
    "router-max-records": _parse_int,
    "router-max-records-per-host": _parse_int,
}

KEYS: tuple[str, ...] = tuple(_PARSERS)
"""Every configuration key, in the order the README documents them."""


def environment_name(key: str) -> str:
    """Spegel's environment variable for a key: ``registry-addr`` → ``REGISTRY_ADDR``."""
    return key.upper().replace("-", "_")


def read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path} is not valid YAML: {e}".replace("\n", " ")) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of keys to values")
    return data


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Merge defaults < file < environment < flags, validating every value."""
    raw: dict[str, Any] = {}
    if path:
        from_file = read_config_file(path)
        for key in from_file:
            if key not in _PARSERS:
                raise ConfigError(str(key), "unknown key")
        raw.update(from_file)
    environ = os.environ if environ is None else environ
    for key in KEYS:
        if environment_name(key) in environ:
            raw[key] = environ[environment_name(key)]
    for key, value in (flags or {}).items():
        if value is not None:
            raw[key] = value
    values = {}
    for key, value in raw.items():
        try:
            values[key.replace("-", "_")] = _PARSERS[key](value)
        except (ValueError, TypeError) as e:
            raise ConfigError(key, str(e)) from e
    config = dataclasses.replace(Config(), **values)
    if config.router_republish_interval >= config.router_record_ttl:
        raise ConfigError(
            "router-republish-interval", "must be shorter than router-record-ttl, or records lapse"
        )
    if config.router_max_records_per_host < 1:
        raise ConfigError("router-max-records-per-host", "must be at least 1")
    if config.router_max_records < config.router_max_records_per_host:
        raise ConfigError("router-max-records", "must be at least router-max-records-per-host")
    return config


def router_secret(config: Config, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The DHT cluster secret: ``ROUTER_SECRET`` itself, or the ``router-secret-file``."""
    environ = os.environ if environ is None else environ
    if environ.get("ROUTER_SECRET"):
        return environ["ROUTER_SECRET"].encode()
    if not config.router_secret_file:
        return None
    try:
        with open(config.router_secret_file, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(
            "router-secret-file", f"cannot read {config.router_secret_file}: {e.strerror}"
        ) from e
    if len(secret) < 16:
        raise ConfigError("router-secret-file", "the secret must be at least 16 bytes")
    return secret
