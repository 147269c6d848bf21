"""The node's configuration: YAML file, then environment, then flags, over defaults.

Key, flag and environment names are Spegel's, so a Spegel user can carry a
configuration over unchanged. Every problem raises ConfigError naming the key.
"""

from __future__ import annotations

import csv
import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml

from spegel_tx.basicauth import (
    DEFAULT_PASSWORD_FILE,
    DEFAULT_USERNAME_FILE,
    BasicAuth,
    read_basic_auth,
)
from spegel_tx.content import FirstWave
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


def format_duration(seconds: float) -> str:
    """A Go duration string for ``seconds``, in the largest unit that holds it whole."""
    for unit in ("h", "m", "s", "ms", "us"):
        count = seconds / _DURATION_UNITS[unit]
        if abs(count - round(count)) < 1e-9 and round(count) != 0:
            return f"{round(count)}{unit}"
    return "0" if seconds == 0 else f"{round(seconds / 1e-9)}ns"


def parse_address(text: str) -> Address:
    """``host:port``, ``:port`` or ``[v6]:port``, as Go's net.Listen takes them."""
    if "," in text:
        raise ValueError(f"{text!r} is more than one address: give each as its own item")
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
    if "," in text:
        raise ValueError(f"{text!r} is more than one registry: give each as its own item")
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


_SIZE = re.compile(r"(\d{1,15})\s*(B|KB|KiB|MB|MiB|GB|GiB)?")
_UNITS = {"B": 1, "KB": 10**3, "KiB": 2**10, "MB": 10**6, "MiB": 2**20, "GB": 10**9, "GiB": 2**30}


def _parse_size(value: Any) -> int:
    """Bytes, as a whole number or with a unit: ``512KiB``, ``1MiB``, ``10MB``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a size such as 512KiB or 1MiB")
    return int(match.group(1)) * _UNITS[match.group(2) or "B"]


def format_size(size: int) -> str:
    """``1048576`` → ``1MiB``: the largest binary unit that divides it."""
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size}B"


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


def split_list(text: str) -> list[str]:
    """Items of one comma-separated text, as Spegel reads a list from its environment:
    CSV, so an item holding a comma is written in double quotes (``"a{1,3}",b``)."""
    try:
        rows = list(csv.reader([text], skipinitialspace=True))
    except csv.Error as e:
        raise ValueError(f"{text!r} is not a comma-separated list: {e}") from e
    return [part.strip() for row in rows for part in row if part.strip()]


@dataclass(frozen=True)
class _ListOf:
    """A list is a YAML list or flag values, one item each, or one comma-separated text."""

    item: Callable[[str], Any]

    def __call__(self, value: Any) -> tuple[Any, ...]:
        if isinstance(value, str):
            items = split_list(value)
        elif isinstance(value, (list, tuple)):
            items = [_parse_str(part).strip() for part in value]
        else:
            raise ValueError(f"{value!r} is not a list")
        return tuple(self.item(part) for part in items)


def _parse_regex(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as e:
        raise ValueError(f"{text!r} is not a valid regular expression: {e}") from e


def _parse_address_value(value: Any) -> Address:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an address: write host:port or :port, in quotes")
    return parse_address(value)


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
    mirror_resume_timeout: float = 10.0
    mirror_min_throughput: int = 1024 * 1024
    shutdown_grace_period: float = 20.0
    first_wave_sharing: str = FirstWave.IN_FLIGHT.value
    in_flight_stall_timeout: float = 3.0
    data_dir: str = ""
    log_level: str = "INFO"
    debug_web_enabled: bool = False
    router_secret_file: str = ""
    basic_auth_username_file: str = DEFAULT_USERNAME_FILE
    basic_auth_password_file: str = DEFAULT_PASSWORD_FILE
    router_record_ttl: float = 19 * 60.0
    router_republish_interval: float = 15 * 60.0
    router_max_records: int = Limits.records
    router_max_records_per_host: int = Limits.records_per_host

    @property
    def forwards(self) -> bool:
        """Whether the node asks peers for what it lacks: only if it has a way to find them."""
        return self.bootstrap_kind == "dns" or bool(self.static_bootstrap_peers)


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "registry-addr": _parse_address_value,
    "router-addr": _parse_address_value,
    "metrics-addr": _parse_address_value,
    "containerd-sock": _parse_str,
    "containerd-namespace": _parse_str,
    "containerd-content-path": _parse_str,
    "bootstrap-kind": _parse_choice(_BOOTSTRAP_KINDS),
    "static-bootstrap-peers": _ListOf(parse_address),
    "dns-bootstrap-domain": _parse_str,
    "mirrored-registries": _ListOf(parse_registry_host),
    "registry-filters": _ListOf(_parse_regex),
    "mirror-resolve-timeout": _parse_duration_value,
    "mirror-resolve-retries": _parse_int,
    "mirror-connect-timeout": _parse_duration_value,
    "mirror-response-timeout": _parse_duration_value,
    "mirror-idle-timeout": _parse_duration_value,
    "mirror-peer-quarantine": _parse_duration_value,
    "mirror-resume-timeout": _parse_duration_value,
    "mirror-min-throughput": _parse_size,
    "shutdown-grace-period": _parse_duration_value,
    "first-wave-sharing": _parse_choice(tuple(mode.value for mode in FirstWave)),
    "in-flight-stall-timeout": _parse_duration_value,
    "data-dir": _parse_str,
    "log-level": _parse_choice(_LOG_LEVELS),
    "debug-web-enabled": _parse_bool,
    "router-secret-file": _parse_str,
    "basic-auth-username-file": _parse_str,
    "basic-auth-password-file": _parse_str,
    "router-record-ttl": _parse_duration_value,
    "router-republish-interval": _parse_duration_value,
    "router-max-records": _parse_int,
    "router-max-records-per-host": _parse_int,
}

KEYS: tuple[str, ...] = tuple(_PARSERS)
"""Every configuration key, in the order the README documents them."""

LIST_KEYS = frozenset(key for key, parse in _PARSERS.items() if isinstance(parse, _ListOf))
"""Keys whose value is a list: flags take them as Spegel's do (space separated)."""

BOOLEAN_KEYS = frozenset(key for key, parse in _PARSERS.items() if parse is _parse_bool)

MEANINGS: dict[str, str] = {
    "registry-addr": "TCP address of the OCI registry containerd is pointed at; "
    "an empty host is every IPv4 interface.",
    "router-addr": "UDP address of the DHT; every node of a cluster uses the same port.",
    "metrics-addr": "HTTP address of /metrics and the debug pages.",
    "containerd-sock": "containerd's gRPC socket.",
    "containerd-namespace": "containerd namespace whose images are served (CRI uses k8s.io).",
    "containerd-content-path": "containerd's content directory, read directly for speed; "
    "empty: ask containerd.",
    "bootstrap-kind": "How the DHT finds its first peers: static or dns.",
    "static-bootstrap-peers": "Router addresses (host:port) of peers, for static; "
    "none: the node serves only its own content and never forwards.",
    "dns-bootstrap-domain": "Name whose A/AAAA records are the peers, for dns "
    "(a headless Service).",
    "mirrored-registries": "Registries served, as URLs or hosts; none: every registry.",
    "registry-filters": "Regular expressions on registry/repository[:tag]; what matches is "
    "neither advertised, served nor forwarded, by tag or by digest.",
    "mirror-resolve-timeout": "How long a peer lookup may stay idle before answering 404.",
    "mirror-resolve-retries": "Providers tried before answering 404.",
    "mirror-connect-timeout": "Time to open a TCP connection to a peer's registry.",
    "mirror-response-timeout": "Time from a forwarded request to the peer's response headers.",
    "mirror-idle-timeout": "Longest silence inside a peer's response body before resuming "
    "from another provider.",
    "mirror-peer-quarantine": "How long a peer that refused, timed out or broke off is tried "
    "after the others (forgiven at once when seen alive).",
    "mirror-resume-timeout": "How long a body broken off part-way waits for a provider, a "
    "restarted one included, to resume it.",
    "mirror-min-throughput": "Bytes a second a peer's body must average while the client "
    "keeps up (512KiB, 1MiB, ...); a slower peer is left for the next.",
    "shutdown-grace-period": "After SIGTERM, how long responses in flight may finish.",
    "first-wave-sharing": "What peers get of an image still being pulled: in-flight (each "
    "blob as it downloads), committed (each blob once complete) or off (the image once "
    "complete).",
    "in-flight-stall-timeout": "A download that has not grown for this long is no longer "
    "offered, and a peer following it is cut off to resume elsewhere.",
    "data-dir": "Where the node keeps its DHT identity across restarts; none: a new id each start.",
    "log-level": "DEBUG, INFO, WARN or ERROR.",
    "debug-web-enabled": "Serve the debug web page at /debug/web/ on metrics-addr.",
    "router-secret-file": "File holding the DHT cluster secret (16 bytes or more); "
    "ROUTER_SECRET gives the secret itself.",
    "basic-auth-username-file": "File holding the username every /v2/ request must carry "
    "(Basic authentication), containerd's and peers'; missing at Spegel's path: no "
    "authentication.",
    "basic-auth-password-file": "File holding the password that goes with the username.",
    "router-record-ttl": "How long a provider record lives on the nodes that store it.",
    "router-max-records": "Provider records the node keeps for others, in all.",
    "router-max-records-per-host": "Provider records the node keeps for any one IP address.",
    "router-republish-interval": "How often the node republishes its own records; "
    "shorter than router-record-ttl.",
}
"""What each key means, for ``--help``; the README's table says more."""


def default_text(key: str) -> str:
    """A key's default as an operator writes it: ``:5000``, ``20ms``, ``none``."""
    value = getattr(Config(), key.replace("-", "_"))
    if _PARSERS[key] is _parse_duration_value:
        return format_duration(value)
    if _PARSERS[key] is _parse_size:
        return format_size(value)
    if isinstance(value, bool):
        return str(value).lower()
    if value in ("", ()):
        return "none"
    return str(value)


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
    """Merge defaults < file < environment < flags, validating every value.

    A bad value's error names the key and, if it came from there, its environment
    variable or flag.
    """
    raw: dict[str, tuple[Any, str]] = {}
    if path:
        from_file = read_config_file(path)
        for key in from_file:
            if key not in _PARSERS:
                raise ConfigError(str(key), f"unknown key in {path}")
        raw.update((key, (value, "")) for key, value in from_file.items())
    environ = os.environ if environ is None else environ
    for key in KEYS:
        if environment_name(key) in environ:
            raw[key] = (environ[environment_name(key)], f" (from {environment_name(key)})")
    for key, value in (flags or {}).items():
        if value is not None:
            raw[key] = (value, f" (from --{key})")
    values = {}
    for key, (value, source) in raw.items():
        try:
            values[key.replace("-", "_")] = _PARSERS[key](value)
        except (ValueError, TypeError) as e:
            raise ConfigError(key, f"{e}{source}") from e
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


MIN_SECRET_BYTES = 16
_NEW_SECRET = "head -c 32 /dev/urandom | base64"


def router_secret(config: Config, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The DHT cluster secret: ``ROUTER_SECRET`` itself, or the ``router-secret-file``'s
    content; surrounding white space is not part of it, and either must hold 16 bytes."""
    environ = os.environ if environ is None else environ
    if environ.get("ROUTER_SECRET"):
        secret = environ["ROUTER_SECRET"].strip().encode()
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(
                "ROUTER_SECRET",
                f"holds {len(secret)} bytes, a cluster secret needs {MIN_SECRET_BYTES} or more: "
                f"give every node the same longer one (`{_NEW_SECRET}` makes one)",
            )
        return secret
    path = config.router_secret_file
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(
            "router-secret-file",
            f"cannot read {path}: {e.strerror}: make it a file this user (uid {os.getuid()}) "
            "can read, or point router-secret-file at the cluster secret",
        ) from e
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            "router-secret-file",
            f"{path} holds {len(secret)} bytes, a cluster secret needs {MIN_SECRET_BYTES} or "
            f"more: put the same longer one on every node (`{_NEW_SECRET} > {path}`)",
        )
    return secret


def basic_auth(config: Config) -> BasicAuth | None:
    """The registry's credentials, read from ``basic-auth-*-file``; None: no authentication."""
    return read_basic_auth(config.basic_auth_username_file, config.basic_auth_password_file)
