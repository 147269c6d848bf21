"""``spegel-tx``: the node and its one-shot commands, under Spegel's subcommand names.

``registry`` runs the daemon (``twistd spegel``'s parser, so both take the same flags);
``configuration`` and ``cleanup`` take Spegel's flags and environment variables (flag over
environment over default), so a Spegel DaemonSet keeps working when only the image
changes. ``doctor`` checks a node's setup.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar, cast

from spegel_tx import __version__, basicauth, doctor
from spegel_tx.config import MEANINGS, environment_name, load_config, split_list
from spegel_tx.containerd import hostsconfig
from spegel_tx.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/containerd/certs.d")
_TRUE = ("1", "t", "true")
_FALSE = ("0", "f", "false")
_LOG_LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")
T = TypeVar("T")


def parse_bool(text: str) -> bool:
    """What Go's strconv.ParseBool takes, as Spegel's ``--resolve-tags=false``."""
    if text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def parse_directory(text: str) -> Path:
    """A path, never empty: an empty one would point at the working directory."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path is not a directory")
    return Path(text)


def parse_timeout(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return seconds


def parse_log_level(text: str) -> str:
    if text.upper() not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(_LOG_LEVELS)}")
    return text.upper()


DESCRIPTION = (
    "spegel-tx serves a Kubernetes node's containerd images to the other nodes, as Spegel "
    "does. Its subcommands take Spegel's names, flags and environment variables, so a "
    "Spegel DaemonSet runs unchanged with this image. Flags beat environment variables, "
    "which beat defaults. A list flag takes its values separated by spaces, or repeated; "
    "its environment variable takes them comma separated."
)

REGISTRY_ARGUMENTS = ("--nodaemon", "--pidfile=", "--logger=spegel_tx.logs.json_observer")
"""What ``registry`` gives twistd: in the foreground (the kubelet or systemd supervises),
no pid file (a read-only root), one JSON object per log line, as Spegel logs."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spegel-tx", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "registry",
        add_help=False,
        help="run the node: the registry containerd pulls through, its DHT router and "
        "metrics (spegel-tx registry --help lists its flags)",
    )
    commands.add_parser("version", help="print the version and exit")

    configuration = commands.add_parser(
        "configuration",
        help="write containerd's hosts.toml mirror configuration and exit",
        description="Back up the registry config directory once into _backup, then write "
        "<path>/<registry>/hosts.toml pointing each mirrored registry at the mirror targets.",
    )
    _add_common(configuration)
    _add_mirrored_registries(
        configuration,
        "none, _default or * writes _default/hosts.toml for every registry "
        "(env MIRRORED_REGISTRIES)",
    )
    configuration.add_argument(
        "--mirror-targets",
        nargs="+",
        action="extend",
        metavar="URL",
        help="the mirrors, in the order containerd tries them (http://127.0.0.1:5000); "
        "required (env MIRROR_TARGETS)",
    )
    configuration.add_argument(
        "--resolve-tags",
        nargs="?",
        const=True,
        type=parse_bool,
        metavar="BOOL",
        help="let the mirrors resolve tags (capability resolve); default true (env RESOLVE_TAGS)",
    )
    configuration.add_argument(
        "--prepend-existing",
        nargs="?",
        const=True,
        type=parse_bool,
        metavar="BOOL",
        help="keep a registry's existing hosts after the mirrors; default false "
        "(env PREPEND_EXISTING)",
    )
    for key, default in (
        ("basic-auth-username-file", basicauth.DEFAULT_USERNAME_FILE),
        ("basic-auth-password-file", basicauth.DEFAULT_PASSWORD_FILE),
    ):
        configuration.add_argument(
            f"--{key}",
            metavar="FILE",
            help=f"{MEANINGS[key]} Written into each hosts.toml as the Authorization header "
            f"containerd sends the mirrors; default {default} (env {environment_name(key)})",
        )

    cleanup = commands.add_parser(
        "cleanup",
        help="restore the registry config directory from _backup and exit",
        description="Put back what the directory held before the first `configuration`, "
        "and remove _backup. Does nothing when there is no _backup.",
    )
    _add_common(cleanup)

    checkup = commands.add_parser(
        "doctor",
        help="check this node's containerd and spegel-tx setup and exit",
        description="One line per check: ok, or what is wrong and what to change. "
        "Exits 0 only if every check passed.",
    )
    checkup.add_argument(
        "--config",
        metavar="FILE",
        help="the node.yaml the daemon runs with; environment variables (REGISTRY_ADDR, ...) "
        "override it as they do for the daemon",
    )
    checkup.add_argument(
        "--containerd-sock", metavar="PATH", help="default: the node's containerd-sock"
    )
    checkup.add_argument(
        "--containerd-config",
        type=Path,
        default=doctor.DEFAULT_CONTAINERD_CONFIG,
        metavar="FILE",
        help=f"containerd's config file; default {doctor.DEFAULT_CONTAINERD_CONFIG}",
    )
    _add_config_path(checkup)
    _add_mirrored_registries(
        checkup, "the hosts.toml files to expect; default the node's mirrored-registries"
    )
    checkup.add_argument(
        "--timeout",
        type=parse_timeout,
        default=1.0,
        metavar="SECONDS",
        help="how long each network check waits for an answer; default 1",
    )
    return parser


def _add_config_path(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--containerd-registry-config-path",
        type=parse_directory,
        metavar="DIR",
        help=f"containerd's registry config_path; default {DEFAULT_CONFIG_PATH} "
        "(env CONTAINERD_REGISTRY_CONFIG_PATH)",
    )


def _add_mirrored_registries(command: argparse.ArgumentParser, default: str) -> None:
    command.add_argument(
        "--mirrored-registries",
        nargs="*",
        action="extend",
        metavar="URL",
        help=f"registries to mirror, space or comma separated (https://docker.io); {default}",
    )


def _add_common(command: argparse.ArgumentParser) -> None:
    _add_config_path(command)
    command.add_argument(
        "--log-level",
        type=parse_log_level,
        metavar="LEVEL",
        help="INFO or DEBUG print each file written or restored; WARN or ERROR only errors "
        "(env LOG_LEVEL)",
    )


def _setting(
    args: argparse.Namespace,
    key: str,
    environ: Mapping[str, str],
    parse: Callable[[str], T],
    default: T,
) -> T:
    """The flag (argparse parsed it), else Spegel's environment variable, else ``default``."""
    flag = getattr(args, key.replace("-", "_"))
    if flag is not None:
        return cast(T, flag)
    text = environ.get(environment_name(key))
    if not text:
        return default
    try:
        return parse(text)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(key, f"{e} (from {environment_name(key)})") from None


def _list_setting(args: argparse.Namespace, key: str, environ: Mapping[str, str]) -> list[str]:
    """The flag's values (space separated or repeated), else the environment variable's
    (comma separated), as Spegel takes lists."""
    values: list[str] = _setting(args, key, environ, split_list, [])
    return [value.strip() for value in values if value.strip()]


def _config_path(args: argparse.Namespace, environ: Mapping[str, str]) -> Path:
    return _setting(
        args, "containerd-registry-config-path", environ, parse_directory, DEFAULT_CONFIG_PATH
    )


def _doctor(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Print each check's line as it ends; 1 if any failed."""
    node = load_config(args.config, environ, {"containerd-sock": args.containerd_sock})
    flagged = _list_setting(args, "mirrored-registries", {})
    if flagged:
        directories = [r.directory for r in hostsconfig.parse_mirrored_registries(flagged)]
    else:
        directories = list(node.mirrored_registries) or [hostsconfig.DEFAULT_DIR]
    checkup = doctor.Checkup(
        node=node,
        environ=environ,
        containerd_config=args.containerd_config,
        hosts_dir=_config_path(args, environ),
        directories=directories,
        timeout=args.timeout,
    )
    passed = True
    for finding in doctor.run_checks(checkup):
        print(finding, flush=True)
        passed = passed and finding.passed
    return 0 if passed else 1


def _run(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    verbose = _setting(args, "log-level", environ, parse_log_level, "INFO") in ("DEBUG", "INFO")
    config_path = _config_path(args, environ)
    if args.command == "cleanup":
        restored = hostsconfig.cleanup_configuration(config_path)
        if verbose:
            done = "restored from" if restored else "nothing to restore: no"
            print(f"{done} {config_path / hostsconfig.BACKUP_DIR}")
        return
    registries = hostsconfig.parse_mirrored_registries(
        _list_setting(args, "mirrored-registries", environ)
    )
    targets = hostsconfig.parse_mirror_targets(_list_setting(args, "mirror-targets", environ))
    auth = basicauth.read_basic_auth(
        _setting(args, "basic-auth-username-file", environ, str, basicauth.DEFAULT_USERNAME_FILE),
        _setting(args, "basic-auth-password-file", environ, str, basicauth.DEFAULT_PASSWORD_FILE),
    )
    written = hostsconfig.apply_configuration(
        config_path,
        registries,
        targets,
        resolve_tags=_setting(args, "resolve-tags", environ, parse_bool, True),
        prepend_existing=_setting(args, "prepend-existing", environ, parse_bool, False),
        authorization=None if auth is None else auth.header().decode("ascii"),
    )
    if verbose:
        for path in written:
            print(f"wrote {path}")


def registry(argv: Sequence[str]) -> int:
    """``twistd spegel`` with ``argv``, as ``REGISTRY_ARGUMENTS`` say; returns once the
    node stops. A bad flag or setting exits with one line before anything starts."""
    from twisted.scripts.twistd import ServerOptions, runApp

    options = ServerOptions()
    options.parseOptions([*REGISTRY_ARGUMENTS, "spegel", *argv])
    runApp(options)
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["registry"]:
        return registry(argv[1:])
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        print(f"spegel-tx {__version__}")
        return 0
    environ = os.environ if environ is None else environ
    try:
        if args.command == "doctor":
            return _doctor(args, environ)
        _run(args, environ)
    except ConfigError as e:
        print(f"spegel-tx {args.command}: error: --{e.key}: {e.problem}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"spegel-tx {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
