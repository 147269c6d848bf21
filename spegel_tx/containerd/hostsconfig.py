"""containerd's registry host configuration (``<config_path>/<registry>/hosts.toml``).

The render and parse functions are pure, so the exact text containerd reads is
tested without a disk. ``apply_configuration`` and ``cleanup_configuration`` do
what Spegel's ``configuration`` and ``cleanup`` commands do to the directory, so
a node set up by either can be cleaned up by the other:

- the first apply moves everything in ``config_path`` into ``_backup``; later
  applies leave ``_backup`` alone, so it always holds the operator's own files;
- each apply leaves only ``_backup`` and the mirrored registries' directories;
- cleanup puts ``_backup``'s entries back and removes ``_backup``.

Unlike Spegel, every file is written to a temporary name and renamed, so
containerd never reads half a file, and an interrupted backup or restore is
finished by the next run instead of losing the entries it had not yet moved.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import stat
import tempfile
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from spegel_tx.errors import ConfigError

BACKUP_DIR = "_backup"
DEFAULT_DIR = "_default"
HOSTS_FILE = "hosts.toml"
DIAL_TIMEOUT = "200ms"
"""Short, as Spegel's: a node whose mirror is down must not delay every pull."""

_WILDCARDS = (DEFAULT_DIR, "*")
_DOCKER_HUB = "https://docker.io"
_DOCKER_HUB_SERVER = "https://registry-1.docker.io"
# A backup being filled, and one being emptied back: their presence tells the
# next run which step was interrupted.
_BACKING_UP = "_backup.partial"
_RESTORING = "_backup.restoring"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


@dataclass(frozen=True)
class MirroredRegistry:
    """A registry to mirror: its directory under ``config_path`` and its upstream.

    ``server`` is None for ``_default``, so containerd keeps each registry's own.
    """

    directory: str
    server: str | None


def _bracket_ipv6(url: str) -> str:
    """``http://fd00::1:5000`` → ``http://[fd00::1]:5000``, as Spegel does for a node IP."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    if not sep or host.count(":") < 2 or "[" in host:
        return url
    address, _, port = host.rpartition(":")
    return f"{scheme}://[{address}]:{port}{slash}{path}"


def _parse_url(text: str, key: str, example: str) -> str:
    """``scheme://host[:port]`` with nothing else, the only form containerd's host keys need."""
    if "," in text:
        raise ConfigError(key, f"{text!r} is more than one URL: give each as its own value")
    url = _bracket_ipv6(text.strip())
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"{text!r} is not an http:// or https:// URL such as {example}")
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(key, f"{text!r} must be scheme://host[:port], with nothing after it")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked for it
    except ValueError:
        raise ConfigError(key, f"{text!r} has an invalid port") from None
    return f"{parts.scheme}://{parts.netloc}"


def parse_mirrored_registries(values: Iterable[str]) -> list[MirroredRegistry]:
    """Spegel's ``--mirrored-registries``: URLs, ``_default`` or ``*``; none means all."""
    registries: dict[str, MirroredRegistry] = {}
    for value in values:
        if value.strip() in _WILDCARDS:
            registry = MirroredRegistry(DEFAULT_DIR, None)
        else:
            url = _parse_url(value, "mirrored-registries", _DOCKER_HUB)
            host = urlsplit(url).netloc
            if host.startswith(BACKUP_DIR):
                raise ConfigError("mirrored-registries", f"{value!r}: {host} is a reserved name")
            server = _DOCKER_HUB_SERVER if url == _DOCKER_HUB else url
            registry = MirroredRegistry(host, server)
        known = registries.setdefault(registry.directory, registry)
        if known != registry:
            raise ConfigError(
                "mirrored-registries",
                f"{registry.directory} is named twice, as {known.server} and {registry.server}",
            )
    return list(registries.values()) or [MirroredRegistry(DEFAULT_DIR, None)]


def parse_mirror_targets(values: Iterable[str]) -> list[str]:
    """Spegel's ``--mirror-targets``: the mirror URLs, in the order containerd tries them."""
    example = "http://127.0.0.1:5000"
    targets = list(dict.fromkeys(_parse_url(value, "mirror-targets", example) for value in values))
    if not targets:
        raise ConfigError("mirror-targets", f"at least one is required, such as {example}")
    return targets


def parse_existing_hosts(text: str) -> dict[str, dict[str, Any]]:
    """The ``[host."..."]`` tables of an existing hosts.toml, in file order.

    Raises ValueError for text containerd would reject too.
    """
    try:
        hosts = tomllib.loads(text).get("host", {})
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"not valid TOML: {e}") from e
    if not isinstance(hosts, dict) or not all(isinstance(h, dict) for h in hosts.values()):
        raise ValueError('`host` must hold only tables, as [host."https://mirror"]')
    return hosts


def render_hosts_toml(
    registry: MirroredRegistry,
    mirror_targets: Sequence[str],
    *,
    resolve_tags: bool,
    existing_hosts: Mapping[str, Mapping[str, Any]] | None = None,
    authorization: str | None = None,
) -> str:
    """The hosts.toml for ``registry``: our mirrors first, then ``existing_hosts``.

    An existing host that is also one of our mirrors is dropped: a table written
    twice makes the whole file invalid and containerd would ignore it.
    ``authorization`` is an ``Authorization`` header containerd sends our mirrors.
    """
    capabilities = ["pull", "resolve"] if resolve_tags else ["pull"]
    sections = [] if registry.server is None else [f"server = {_toml_value(registry.server)}"]
    ours: dict[str, Any] = {"capabilities": capabilities, "dial_timeout": DIAL_TIMEOUT}
    if authorization is not None:
        ours["header"] = {"Authorization": authorization}
    hosts: dict[str, Mapping[str, Any]] = {target: ours for target in mirror_targets}
    hosts |= {h: t for h, t in (existing_hosts or {}).items() if h not in mirror_targets}
    if any("]" in host for host in hosts):
        # containerd 1.6's TOML reader ends a table header at the first "]", even in
        # quotes: [host."http://[fd00::1]:5000"] is an error and the file is ignored.
        # Keys of one [host] table, in the same order, read fine.
        entries = [f"  {_toml_key(host)} = {_toml_value(table)}" for host, table in hosts.items()]
        sections.append("\n".join(["[host]", *entries]))
    else:
        sections += [_toml_table(["host", host], table) for host, table in hosts.items()]
    return "\n\n".join(sections) + "\n"


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    def escape(char: str) -> str:
        if char in _ESCAPES:
            return _ESCAPES[char]
        return f"\\u{ord(char):04x}" if ord(char) < 0x20 or ord(char) == 0x7F else char

    return '"' + "".join(map(escape, text)) + '"'


def _toml_value(value: Any) -> str:
    """Any value tomllib returns, written back as TOML (tables inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 1.5, 1e+100, inf, -inf and nan are TOML as they are
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, dict):
        pairs = (f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(pairs) + " }" if value else "{}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_table(path: Sequence[str], table: Mapping[str, Any]) -> str:
    """``[a."b"]`` with its values, then each sub-table as ``[a."b".c]``."""
    lines = ["[" + ".".join(map(_toml_key, path)) + "]"]
    tables = {key: value for key, value in table.items() if isinstance(value, dict)}
    lines += [f"  {_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if k not in tables]
    return "\n".join([*lines, *(_toml_table([*path, k], v) for k, v in tables.items())])


def apply_configuration(
    config_path: Path,
    registries: Sequence[MirroredRegistry],
    mirror_targets: Sequence[str],
    *,
    resolve_tags: bool,
    prepend_existing: bool,
    authorization: str | None = None,
) -> list[Path]:
    """Back up ``config_path`` once, then leave only our registries' hosts.toml beside it.

    With ``prepend_existing``, a registry's backed-up hosts follow ours, and the
    other files of its directory (certificates they name) are copied back too.
    A hosts.toml holding ``authorization`` is readable by its owner only.
    Returns the hosts.toml files written.
    """
    if (config_path / _RESTORING).exists():
        cleanup_configuration(config_path)
    # Read what is to be kept before moving anything: a broken file changes nothing.
    kept = {
        registry.directory: _existing(_original(config_path, registry.directory))
        for registry in registries
        if prepend_existing
    }
    config_path.mkdir(parents=True, exist_ok=True)
    _backup_once(config_path)
    wanted = {registry.directory for registry in registries}
    for entry in config_path.iterdir():
        if entry.name != BACKUP_DIR and (entry.name not in wanted or not _is_dir(entry)):
            _remove(entry)
    written = []
    for registry in registries:
        existing, extra_files = kept.get(registry.directory, ({}, []))
        text = render_hosts_toml(
            registry,
            mirror_targets,
            resolve_tags=resolve_tags,
            existing_hosts=existing,
            authorization=authorization,
        )
        directory = config_path / registry.directory
        backed_up = config_path / BACKUP_DIR / registry.directory
        mode = 0o644 if authorization is None else 0o600
        written.append(_write_registry_dir(directory, text, backed_up, extra_files, mode))
    return written


def cleanup_configuration(config_path: Path) -> bool:
    """Put back what ``config_path`` held before the first apply; False if nothing was backed up."""
    backup = config_path / BACKUP_DIR
    restoring = config_path / _RESTORING
    if backup.is_dir():
        for entry in config_path.iterdir():
            if entry.name != BACKUP_DIR:
                _remove(entry)
        backup.rename(restoring)
    elif (config_path / _BACKING_UP).is_dir():
        # The backup was interrupted before anything of ours was written.
        (config_path / _BACKING_UP).rename(restoring)
    if not restoring.is_dir():
        return False
    for entry in restoring.iterdir():
        entry.rename(config_path / entry.name)
    restoring.rmdir()
    return True


def _backup_once(config_path: Path) -> None:
    """Move every entry into ``_backup``, unless an earlier run did."""
    if (config_path / BACKUP_DIR).is_dir():
        return
    partial = config_path / _BACKING_UP
    partial.mkdir(exist_ok=True)
    for entry in config_path.iterdir():
        if entry.name != _BACKING_UP:
            entry.rename(partial / entry.name)
    partial.rename(config_path / BACKUP_DIR)


def _original(config_path: Path, directory: str) -> Path:
    """Where the operator's own files for a registry are now: in ``_backup`` once it is taken."""
    if (config_path / BACKUP_DIR).is_dir():
        return config_path / BACKUP_DIR / directory
    moved = config_path / _BACKING_UP / directory
    return moved if os.path.lexists(moved) else config_path / directory


def _existing(directory: Path) -> tuple[dict[str, dict[str, Any]], list[Path]]:
    """A registry directory's hosts, and the files beside its hosts.toml (relative paths).

    The files (certificates the hosts name) are kept only along with hosts to keep.
    """
    hosts_file = directory / HOSTS_FILE
    if not hosts_file.is_file():
        return {}, []
    try:
        existing = parse_existing_hosts(hosts_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot prepend {hosts_file}: {e}") from e
    if not existing:
        return {}, []
    files = [
        Path(root, name).relative_to(directory)
        for root, _, names in os.walk(directory)
        for name in names
    ]
    return existing, [path for path in files if path != Path(HOSTS_FILE)]


def _write_registry_dir(
    directory: Path, text: str, backed_up: Path, extra_files: Sequence[Path], mode: int
) -> Path:
    """Copy the extra files from ``backed_up``, write hosts.toml, then drop anything else."""
    directory.mkdir(exist_ok=True)
    for relative in extra_files:
        source = backed_up / relative
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(source.stat().st_mode)
        _write_atomic(directory / relative, source.read_bytes(), mode)
    hosts_file = directory / HOSTS_FILE
    _write_atomic(hosts_file, text.encode(), mode)
    keep = {Path(HOSTS_FILE), *extra_files}
    for root, dirs, names in os.walk(directory, topdown=False):
        for name in names:
            if Path(root, name).relative_to(directory) not in keep:
                os.unlink(Path(root, name))
        for name in dirs:
            path = Path(root, name)
            if path.is_symlink() or not any(path.iterdir()):
                _remove(path)
    return hosts_file


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """A temporary file in the same directory renamed over ``path``: readers see old or new."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    if _is_dir(path):
        shutil.rmtree(path)
    else:
        path.unlink()
