"""``spegel-tx doctor``: check a node as an operator would, one line per check.

Most trouble is node setup that fails silently: containerd's ``config_path`` unset,
``discard_unpacked_layers`` on, a hosts.toml containerd ignores. Each check says
what is wrong and which file and key to change.

The rules (containerd's config files and merge, hosts.toml) are pure functions
over parsed TOML, tested without a disk. The I/O checks are thin and blocking
(urllib, a UDP socket, grpc's sync client): the doctor runs once and waits for
one answer at a time, so a reactor would only add start-up and shutdown code.
"""

from __future__ import annotations

import glob
import hashlib
import http.client
import json
import os
import re
import socket
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spegel_tx.config import Address, Config, basic_auth, parse_duration, router_secret
from spegel_tx.containerd import hostsconfig
from spegel_tx.containerd.client import ContainerdClient
from spegel_tx.errors import ConfigError, SpegelError
from spegel_tx.routing.kademlia.codec import DecodeError, decode, encode
from spegel_tx.routing.kademlia.messages import (
    NO_RECEIVER,
    Binding,
    Header,
    Message,
    Ping,
    Pong,
)

DEFAULT_CONTAINERD_CONFIG = Path("/etc/containerd/config.toml")
CAPABILITIES = ("pull", "resolve", "push")
CRI_PLUGIN_IDS = ("cri", "io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images")
DEFAULT_CONFIG_PATH_2_2 = "/etc/containerd/certs.d:/etc/docker/certs.d"
"""What containerd 2.2 and later use when ``config_path`` and ``mirrors`` are both unset."""

# Where the CRI settings live, by config version: plugin id, then the table inside it.
REGISTRY_TABLES = {
    1: ("cri", "registry"),
    2: ("io.containerd.grpc.v1.cri", "registry"),
    3: ("io.containerd.cri.v1.images", "registry"),
}
IMAGES_TABLES = {
    1: ("cri", "containerd"),
    2: ("io.containerd.grpc.v1.cri", "containerd"),
    3: ("io.containerd.cri.v1.images",),
}
PULL_TABLES = {
    1: ("cri",),
    2: ("io.containerd.grpc.v1.cri",),
    3: ("io.containerd.cri.v1.images",),
}
"""Where ``max_concurrent_downloads`` and ``image_pull_with_sync_fs`` live."""
LOCAL_PULL_TABLES = dict.fromkeys((1, 2, 3), ("io.containerd.cri.v1.images",))
"""``use_local_image_pull`` exists only in containerd 2.x's images plugin; 2.x keeps that
section when it migrates an older file's CRI settings into it."""
TRANSFER_SERVICE_SINCE = (2, 1)
"""From containerd 2.1 the CRI plugin pulls through the transfer service, which reads
``config_path`` as one directory where the local pull reads a list (containerd#12415)."""
DOCTOR_ID = hashlib.sha256(b"spegel-tx doctor").digest()
"""The node id the doctor pings with. A ping makes its sender a contact of the node until the
node's next search finds it silent; a fixed id lets the peers check leave doctors out, so a
second run does not count the first one as a peer."""
_IGNORED = "containerd ignores the whole file"
_RESTART = "and restart containerd"
_MISSING = object()
_NETWORK_ERRORS = (OSError, http.client.HTTPException)
_WILDCARD_HOSTS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True)
class Finding:
    """One output line: whether the check passed, and what to change if not."""

    passed: bool
    text: str

    def __str__(self) -> str:
        return f"{'ok' if self.passed else 'FAIL':<6}{self.text}"


def ok(text: str) -> Finding:
    return Finding(True, text)


def fail(text: str) -> Finding:
    return Finding(False, text)


# containerd's config.toml and its imports


@dataclass(frozen=True)
class ConfigFile:
    """One parsed file: the main config.toml or one of its imports, in containerd's order."""

    path: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class Setting:
    value: Any
    path: str
    """The file that sets it (a later import overrides an earlier file)."""
    table: str


def parse_config_file(path: str, text: str) -> ConfigFile:
    """ValueError for text containerd would refuse to start with."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML ({e}): containerd will not start") from e
    version = data.get("version", 1)
    if version not in REGISTRY_TABLES:
        raise ValueError(f"{path}: version = {version!r} is not 1, 2 or 3")
    return ConfigFile(path, data)


def import_patterns(parent: str, imports: Any) -> list[str]:
    """containerd's resolution: cleaned, relative to the importing file's directory."""
    if not isinstance(imports, list) or not all(isinstance(i, str) for i in imports):
        raise ValueError(f"{parent}: imports must be a list of paths")
    return [os.path.normpath(os.path.join(os.path.dirname(parent), i)) for i in imports]


def release(version: str | None) -> tuple[int, int] | None:
    """``(major, minor)`` of a containerd version such as ``1.6.20~ds1`` or ``v2.1.0``."""
    match = re.match(r"v?(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def config_version(files: Sequence[ConfigFile]) -> int:
    """The highest version any file declares (2.x migrates the others up to it); 1 if none."""
    return max((f.data.get("version", 1) for f in files), default=1)


def replaces_plugin_sections(files: Sequence[ConfigFile], running: tuple[int, int] | None) -> bool:
    """containerd 1.x merges imports plugin by plugin: a later file's section for a plugin
    replaces the earlier one whole. 2.x merges key by key. Without a running containerd
    to ask, a version 3 config means 2.x."""
    if running is None:
        return config_version(files) < 3
    return running < (2, 0)


def table_name(tables: Mapping[int, tuple[str, ...]], version: int) -> str:
    """``[plugins."io.containerd.grpc.v1.cri".registry]``, as the operator writes it."""
    return "[plugins." + ".".join(f'"{p}"' if "." in p else p for p in tables[version]) + "]"


def find_setting(
    files: Sequence[ConfigFile],
    tables: Mapping[int, tuple[str, ...]],
    key: str,
    whole_sections: bool,
) -> Setting | None:
    """The value containerd ends up with for ``key``, and the file it comes from.

    A file without ``version`` is read with the main file's, as containerd 1.x does.
    """
    main_version = files[0].data.get("version", 1) if files else 1
    found = None
    for file in files:
        version = file.data.get("version", main_version)
        plugin, *inner = tables[version]
        section = _lookup(file.data, ("plugins", plugin))
        if not isinstance(section, dict):
            continue
        value = _lookup(section, (*inner, key))
        if value is not _MISSING:
            found = Setting(value, file.path, table_name(tables, version))
        elif whole_sections:
            found = None
    return found


def _lookup(data: Any, path: Sequence[str]) -> Any:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def _where(files: Sequence[ConfigFile]) -> str:
    return files[0].path + (" or its imports" if len(files) > 1 else "")


def check_config_path(
    files: Sequence[ConfigFile],
    config_file: str,
    hosts_dir: str,
    running: tuple[int, int] | None,
) -> Finding:
    """The CRI plugin runs and reads hosts.toml files from ``hosts_dir``."""
    new_default = running is not None and running >= (2, 2)
    if files:
        version = config_version(files)
    else:
        version = 3 if running is not None and running >= (2, 0) else 2
    table = table_name(REGISTRY_TABLES, version)
    fix = f'set config_path = "{hosts_dir}" under {table} {_RESTART}'
    if not files and not new_default:
        return fail(
            f"no {config_file}: containerd runs on its defaults, where the CRI registry "
            f"config_path is unset and no hosts.toml is read; create it with version = "
            f"{version} and {fix}"
        )
    disabled = sorted(
        {p for f in files for p in f.data.get("disabled_plugins", []) if p in CRI_PLUGIN_IDS}
    )
    if disabled:
        return fail(
            f"the CRI plugin is disabled (disabled_plugins in {_where(files)} lists "
            f"{', '.join(disabled)}): Kubernetes pulls through it; remove it {_RESTART}"
        )
    whole = replaces_plugin_sections(files, running)
    setting = find_setting(files, REGISTRY_TABLES, "config_path", whole)
    mirrors = find_setting(files, REGISTRY_TABLES, "mirrors", whole)
    if setting is not None and setting.value and mirrors is not None and mirrors.value:
        return fail(
            f"config_path and the deprecated mirrors are both set under {setting.table} "
            f"({_where(files)}): containerd's CRI plugin refuses to start; remove the mirrors "
            f"{_RESTART}"
        )
    if setting is not None and not isinstance(setting.value, str):
        return fail(f"config_path in {setting.path} is not a string: containerd will not start")
    if setting is None or not setting.value:
        if not new_default or (mirrors is not None and mirrors.value):
            return fail(f"config_path is not set in {_where(files)}: {fix}")
        setting = Setting(DEFAULT_CONFIG_PATH_2_2, "containerd's default", table)
    listed = ""
    if os.pathsep in setting.value and pulls_through_transfer_service(files, running):
        reason = local_pull_reason(files, whole)
        if reason is None:
            return fail(_transfer_service_problem(files, setting, hosts_dir, running, whole))
        listed = f", read as a list: {reason} makes containerd pull without its transfer service"
    roots = [os.path.normpath(root) for root in setting.value.split(os.pathsep) if root]
    if os.path.normpath(hosts_dir) in roots:
        return ok(f'config_path = "{setting.value}" ({setting.path}){listed}')
    return fail(
        f'config_path = "{setting.value}" ({setting.path}), but the hosts.toml files are in '
        f"{hosts_dir}: {fix}, or write them with spegel-tx configuration "
        f"--containerd-registry-config-path {roots[0] if roots else setting.value}"
    )


def pulls_through_transfer_service(
    files: Sequence[ConfigFile], running: tuple[int, int] | None
) -> bool:
    """Whether this containerd is one whose CRI plugin can pull through the transfer service.
    Without a running containerd to ask, a version 3 config means 2.x."""
    if running is None:
        return config_version(files) >= 3
    return running >= TRANSFER_SERVICE_SINCE


def local_pull_reason(files: Sequence[ConfigFile], whole: bool) -> str | None:
    """The setting that makes containerd 2.1+ pull with its local client, which reads
    ``config_path`` as a list; None when it pulls through the transfer service.

    containerd checks these at start-up, in this order: ``use_local_image_pull``, then the
    settings the transfer service does not support. ``discard_unpacked_layers = true`` is
    one of them, but it is left out here: this node needs it off.
    """
    rules: list[tuple[Mapping[int, tuple[str, ...]], str, Any]] = [
        (LOCAL_PULL_TABLES, "use_local_image_pull", lambda v: v is True),
        (IMAGES_TABLES, "disable_snapshot_annotations", lambda v: v is False),
        (REGISTRY_TABLES, "mirrors", bool),
        (REGISTRY_TABLES, "configs", bool),
        (REGISTRY_TABLES, "auths", bool),
        (PULL_TABLES, "max_concurrent_downloads", lambda v: v != 3),
        (PULL_TABLES, "image_pull_with_sync_fs", lambda v: v is True),
    ]
    for tables, key, forces_local in rules:
        setting = find_setting(files, tables, key, whole)
        if setting is None or not forces_local(setting.value):
            continue
        if isinstance(setting.value, dict):
            return f"registry.{key} in {setting.path}"
        return f"{key} = {json.dumps(setting.value)} in {setting.path}"
    return None


def _transfer_service_problem(
    files: Sequence[ConfigFile],
    setting: Setting,
    hosts_dir: str,
    running: tuple[int, int] | None,
    whole: bool,
) -> str:
    which = f"containerd {running[0]}.{running[1]}" if running else "containerd 2.1 and later"
    text = (
        f'config_path = "{setting.value}" ({setting.path}) lists several directories, but '
        f"{which} pulls through its transfer service, which reads config_path as one "
        "directory: no hosts.toml is read and no pull uses the mirror. Either set "
        f'config_path = "{hosts_dir}" under {setting.table}, or set use_local_image_pull = '
        f"true under {table_name(LOCAL_PULL_TABLES, 3)}; then restart containerd"
    )
    discard = find_setting(files, IMAGES_TABLES, "discard_unpacked_layers", whole)
    if discard is not None and discard.value is True:
        text += (
            f" (today discard_unpacked_layers = true in {discard.path} makes containerd pull "
            "without the transfer service, but this node needs it off to have layers to serve)"
        )
    return text


def check_discard(
    files: Sequence[ConfigFile], config_file: str, running: tuple[int, int] | None
) -> Finding:
    """Layers stay in the content store once unpacked, so the node has them to serve."""
    if not files:
        return ok(f"discard_unpacked_layers is off (containerd's default: no {config_file})")
    whole = replaces_plugin_sections(files, running)
    setting = find_setting(files, IMAGES_TABLES, "discard_unpacked_layers", whole)
    if setting is None:
        return ok(f"discard_unpacked_layers is off (unset in {_where(files)})")
    if setting.value is False:
        return ok(f"discard_unpacked_layers = false ({setting.path})")
    value = "true" if setting.value is True else repr(setting.value)
    return fail(
        f"discard_unpacked_layers = {value} in {setting.path}: set it to false under "
        f"{setting.table} {_RESTART}; until then containerd deletes every layer it unpacks "
        "and this node has none to serve"
    )


# hosts.toml


@dataclass(frozen=True)
class HostsReview:
    hosts: tuple[str, ...]
    """What containerd tries, in order: each ``[host."..."]`` with its capabilities, then
    the server."""
    problems: tuple[str, ...]


def review_hosts_toml(text: str) -> HostsReview:
    """containerd's rules for a hosts.toml (1.6 to 2.x)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return HostsReview((), (f"not valid TOML ({e}): {_IGNORED}",))
    problems = []
    hosts = data.get("host", _MISSING)
    if hosts is _MISSING:
        problems.append('no [host."..."] table: containerd 1.6 ignores the whole file')
        hosts = {}
    elif not isinstance(hosts, dict) or not all(isinstance(h, dict) for h in hosts.values()):
        problems.append(f'host must hold only tables such as [host."http://..."]: {_IGNORED}')
        hosts = {}
    for name, table in hosts.items():
        if not _has_scheme(name):
            problems.append(
                f'host "{name}" has no scheme: containerd tries https://{name}, and when that '
                f'fails falls back to the upstream without a word; write [host."http://{name}"]'
            )
        problems += _host_table_problems(f'[host."{name}"]', table)
    server = data.get("server")
    if server is not None and not isinstance(server, str):
        problems.append(f"server must be a string: {_IGNORED}")
    elif server and not _has_scheme(server):
        problems.append(
            f'server = "{server}" has no scheme: containerd reads it as https://{server}; '
            f'write server = "https://{server}"'
        )
    problems += _host_table_problems("the top level", data)
    capable = [name for name, table in hosts.items() if "pull" in _capabilities(table)]
    if hosts and not capable:
        problems.append('no [host."..."] has the pull capability: no pull goes to a mirror')
    tried = [f"{name} ({', '.join(_capabilities(table))})" for name, table in hosts.items()]
    tried.append(server if isinstance(server, str) and server else "the registry itself")
    return HostsReview(tuple(tried), tuple(problems))


def _has_scheme(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _capabilities(table: Mapping[str, Any]) -> list[str]:
    """The capabilities containerd grants: all three when none are listed."""
    listed = table.get("capabilities")
    if not isinstance(listed, list) or not listed:
        return list(CAPABILITIES)
    return [str(c).lower() for c in listed]


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _host_table_problems(where: str, table: Mapping[str, Any]) -> list[str]:
    """The value types containerd decodes a host table into; any mismatch drops the file."""
    problems = []
    capabilities = table.get("capabilities", [])
    if not _strings(capabilities):
        problems.append(f"{where}: capabilities must be a list of strings")
    else:
        unknown = [c for c in capabilities if c.lower() not in CAPABILITIES]
        if unknown:
            problems.append(
                f"{where}: unknown capability {', '.join(unknown)} (only pull, resolve, push)"
            )
    for key in ("skip_verify", "override_path"):
        if key in table and not isinstance(table[key], bool):
            problems.append(f"{where}: {key} must be true or false")
    if "ca" in table and not (isinstance(table["ca"], str) or _strings(table["ca"])):
        problems.append(f"{where}: ca must be a path or a list of paths")
    client = table.get("client", "")
    pairs = client if isinstance(client, list) else [client]
    if not all(isinstance(p, str) or (_strings(p) and len(p) == 2) for p in pairs):
        problems.append(f"{where}: client must be a path, or a list of paths or pairs of paths")
    header = table.get("header", {})
    if not isinstance(header, dict) or not all(
        isinstance(v, str) or _strings(v) for v in header.values()
    ):
        problems.append(f"{where}: header must be a table of strings or lists of strings")
    problems += _dial_timeout_problems(where, table.get("dial_timeout", "0"))
    return [f"{problem}: {_IGNORED}" for problem in problems]


def _dial_timeout_problems(where: str, value: Any) -> list[str]:
    try:
        parse_duration(value)
    except (ValueError, AttributeError):
        return [f"{where}: dial_timeout {value!r} is not a duration such as 200ms"]
    return []


def hosts_finding(path: Path, review: HostsReview, note: str = "") -> Finding:
    if review.problems:
        return fail(f"{path}: " + "; ".join(review.problems))
    return ok(f"{path}: tries {', then '.join(review.hosts)}{note}")


# The I/O checks


def check_containerd(address: str, namespace: str, timeout: float) -> tuple[Finding, str | None]:
    """containerd answers its Version service; its version decides how its config reads."""
    client = ContainerdClient(address, namespace, timeout)
    try:
        answer = client.version()
    except SpegelError as e:
        # grpc's message names the address three times; its last part is the cause.
        cause = str(e).rsplit("error: ", 1)[-1]
        return fail(
            f"containerd not reachable at {address} ({cause}): check containerd-sock, that "
            "containerd runs, and that this user may open the socket"
        ), None
    finally:
        client.close()
    return ok(f"containerd {answer.version} at {address}"), answer.version


def load_containerd_config(path: Path) -> list[ConfigFile]:
    """The main file, then its imports breadth first as containerd loads them (globs sorted,
    each file once); [] when the main file does not exist (containerd's defaults)."""
    if not path.exists():
        return []
    files: list[ConfigFile] = []
    pending = [str(path)]
    while pending:
        current = pending.pop(0)
        if any(f.path == current for f in files):
            continue
        try:
            text = Path(current).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(
                f"{current} is imported but missing: containerd will not start"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {current}: {e}") from e
        file = parse_config_file(current, text)
        files.append(file)
        for pattern in import_patterns(current, file.data.get("imports", [])):
            pending += sorted(glob.glob(pattern)) if "*" in pattern else [pattern]
    return files


def check_containerd_config(
    config_file: Path, hosts_dir: Path, version: str | None
) -> list[Finding]:
    try:
        files = load_containerd_config(config_file)
    except ValueError as e:
        return [fail(str(e))]
    running = release(version)
    return [
        check_config_path(files, str(config_file), str(hosts_dir), running),
        check_discard(files, str(config_file), running),
    ]


def check_hosts_files(
    hosts_dir: Path, directories: Sequence[str], mirror_url: str
) -> list[Finding]:
    """Our hosts.toml for each mirrored registry, and every other one containerd reads."""
    configure = (
        f"run spegel-tx configuration --containerd-registry-config-path {hosts_dir} "
        f"--mirror-targets {mirror_url}"
    )
    if not hosts_dir.is_dir():
        return [fail(f"no directory {hosts_dir}: {configure}")]
    others = sorted(
        entry.name
        for entry in hosts_dir.iterdir()
        if entry.name not in directories
        and entry.name != hostsconfig.BACKUP_DIR
        and (entry / hostsconfig.HOSTS_FILE).is_file()
    )
    findings = []
    for name in [*directories, *others]:
        path = hosts_dir / name / hostsconfig.HOSTS_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            pulls = "every registry" if name == hostsconfig.DEFAULT_DIR else name
            findings.append(
                fail(f"no {path}: containerd pulls {pulls} without the mirror; {configure}")
            )
            continue
        except (OSError, UnicodeDecodeError) as e:
            findings.append(fail(f"cannot read {path}: {e}"))
            continue
        shadowing = name in others and hostsconfig.DEFAULT_DIR in directories
        note = f" (not ours: {name} pulls use it instead of _default)" if shadowing else ""
        findings.append(hosts_finding(path, review_hosts_toml(text), note))
    return findings


def connect_address(address: Address) -> Address:
    """Where to reach a listening address from this node: a wildcard host is loopback."""
    return Address(_WILDCARD_HOSTS.get(address.host, address.host), address.port)


def _http_get(
    url: str, timeout: float, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    """Status and body, errors included; a node's own address never goes through a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _reason(error: Exception) -> str:
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    return str(getattr(reason, "strerror", None) or reason)


def check_registry(config: Config, timeout: float) -> Finding:
    """``/v2/`` asked with the node's own credentials, as containerd asks it."""
    base = f"http://{connect_address(config.registry_addr)}"
    try:
        auth = basic_auth(config)
    except ConfigError as e:
        return fail(f"registry {base}: cannot read its credentials: {e}")
    headers = {} if auth is None else {"Authorization": auth.header().decode("ascii")}
    answers = {}
    for path in ("/v2/", "/readyz"):
        try:
            answers[path] = _http_get(base + path, timeout, headers)
        except _NETWORK_ERRORS as e:
            return fail(
                f"registry {base}{path} not reachable ({_reason(e)}): is spegel-tx running "
                f"with registry-addr {config.registry_addr}?"
            )
    for path, (status, body) in answers.items():
        if status != 200:
            said = body.decode("utf-8", "replace").strip()
            return fail(f"registry {base}{path} answers {status}: {said}")
    return ok(f"registry {base}: /v2/ 200, /readyz 200")


def real_peers(page: bytes) -> list[Any] | None:
    """The routing table of a /debug/peers page, without doctors; None if it has none."""
    try:
        peers = json.loads(page)["peers"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(peers, list):
        return None
    return [p for p in peers if not isinstance(p, dict) or p.get("node_id") != DOCTOR_ID.hex()]


def check_peers(config: Config, timeout: float) -> Finding:
    url = f"http://{connect_address(config.metrics_addr)}/debug/peers"
    try:
        status, body = _http_get(url, timeout)
    except _NETWORK_ERRORS as e:
        return fail(f"{url} not reachable ({_reason(e)}): check metrics-addr")
    peers = real_peers(body) if status == 200 else None
    if peers is None:
        return fail(f"{url} answers {status} without a peers list")
    if peers:
        return ok(f"{len(peers)} DHT peer{'s' if len(peers) > 1 else ''} known ({url})")
    return fail(no_peers_advice(config))


def no_peers_advice(config: Config) -> str:
    if config.bootstrap_kind == "static" and not config.static_bootstrap_peers:
        return (
            "no peers: bootstrap-kind is static and static-bootstrap-peers is empty, so this "
            "node serves only its own content; name the other nodes' router addresses"
        )
    return (
        "no peers: check bootstrap (static-bootstrap-peers / dns-bootstrap-domain) and that "
        f"UDP {config.router_addr.port} is open between nodes"
    )


def ping_datagram(txid: bytes, secret: bytes | None, source: tuple[str, int]) -> bytes:
    """A DHT Ping from DOCTOR_ID, stamped now (a signed one must be fresh) and, when
    signed, bound to ``source``, the address it leaves from, for whichever node listens."""
    header = Header(txid, DOCTOR_ID, 0, int(time.time() * 1000))
    binding = Binding(NO_RECEIVER, source[0], source[1]) if secret is not None else None
    return encode(Message(header, Ping(), binding), secret)


def is_pong(datagram: bytes, txid: bytes, secret: bytes | None) -> bool:
    try:
        message = decode(datagram, secret)
    except DecodeError:
        return False
    for_us = message.binding is None or message.binding.receiver_id == DOCTOR_ID
    return message.header.txid == txid and isinstance(message.body, Pong) and for_us


def check_router(config: Config, environ: Mapping[str, str], timeout: float) -> Finding:
    """A real DHT ping over UDP, signed with the cluster secret when there is one.

    The socket is connected, so a port nobody listens on fails at once (ICMP port
    unreachable) instead of waiting for the timeout.
    """
    address = connect_address(config.router_addr)
    try:
        secret = router_secret(config, environ)
    except ConfigError as e:
        return fail(f"router: cannot sign a ping: {e}")
    signed = " (signed with the cluster secret)" if secret else ""
    txid = os.urandom(8)
    started = time.monotonic()
    try:
        family, kind, _, _, sockaddr = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_DGRAM
        )[0]
        with socket.socket(family, kind) as sock:
            sock.connect(sockaddr)
            source = sock.getsockname()
            sock.send(ping_datagram(txid, secret, (source[0], source[1])))
            answered = False
            while not answered:  # a stray datagram is skipped, not taken for the answer
                answered = is_pong(_receive(sock, started + timeout), txid, secret)
    except ConnectionRefusedError:
        return fail(
            f"router {address}: nothing listens on UDP {address.port}: is spegel-tx running "
            f"with router-addr {config.router_addr}?"
        )
    except TimeoutError:
        return fail(
            f"router {address} did not answer a DHT ping{signed} within {timeout:g}s: check "
            f"router-addr, that UDP {address.port} is open, and that ROUTER_SECRET or "
            "router-secret-file is the node's"
        )
    except OSError as e:
        return fail(f"router {address}: {_reason(e)}")
    elapsed = (time.monotonic() - started) * 1000
    return ok(f"router {address} answered a DHT ping{signed} in {elapsed:.1f} ms")


def _receive(sock: socket.socket, deadline: float) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)
    return sock.recv(65536)


@dataclass(frozen=True)
class Checkup:
    """What the doctor checks, from the node's config and the command line."""

    node: Config
    environ: Mapping[str, str]
    containerd_config: Path
    hosts_dir: Path
    directories: Sequence[str]
    """The hosts.toml directories the mirrored registries need (``_default`` for all)."""
    timeout: float


def run_checks(checkup: Checkup) -> Iterator[Finding]:
    """Every check, in order."""
    node, timeout = checkup.node, checkup.timeout
    finding, version = check_containerd(node.containerd_sock, node.containerd_namespace, timeout)
    yield finding
    yield from check_containerd_config(checkup.containerd_config, checkup.hosts_dir, version)
    mirror_url = f"http://{connect_address(node.registry_addr)}"
    yield from check_hosts_files(checkup.hosts_dir, checkup.directories, mirror_url)
    yield check_registry(node, timeout)
    yield check_router(node, checkup.environ, timeout)
    yield check_peers(node, timeout)
