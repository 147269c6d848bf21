"""``twistd spegel``: parse options into a Config and build the node's service.

Everything that can be checked before the reactor runs is checked here, and a problem
ends the process with one line naming the key and what to change: no usage text, no
traceback. ``spegel-tx registry`` runs this same parser, so both take the same flags.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from spegel_tx import __version__, logs
from spegel_tx.basicauth import BasicAuth
from spegel_tx.config import (
    BOOLEAN_KEYS,
    KEYS,
    LIST_KEYS,
    MEANINGS,
    Config,
    basic_auth,
    default_text,
    environment_name,
    load_config,
    router_secret,
)
from spegel_tx.errors import ConfigError
from spegel_tx.routing.kademlia.node import load_or_create_node_id

_log = Logger()

HTTP_BOOTSTRAP = "HTTP bootstrap is not supported: use bootstrap-kind dns or static"
REFUSED_SPEGEL_FLAGS = {
    "http-bootstrap-addr": HTTP_BOOTSTRAP,
    "http-bootstrap-peer": HTTP_BOOTSTRAP,
    "http-bootstrap-url": HTTP_BOOTSTRAP,
    "http-bootstrap-cert-dir": HTTP_BOOTSTRAP,
}
"""Spegel ``registry`` flags for things spegel-tx does not do: ignoring them would start a
node that behaves otherwise than asked."""

IGNORED_SPEGEL_FLAGS = {
    "containerd-registry-config-path": "ignored: only `spegel-tx configuration` and "
    "`spegel-tx doctor` read containerd's registry config",
    "resolve-latest-tag": "ignored: every tag is resolved (use registry-filters ':latest$' "
    "to serve no :latest tag)",
}
"""Spegel ``registry`` flags that change nothing here (older Spegel charts pass them):
accepted, with a warning at start."""


def flag_help(key: str) -> str:
    lists = " Values separated by spaces or the flag repeated;" if key in LIST_KEYS else ""
    env = environment_name(key) + (" (comma separated)" if key in LIST_KEYS else "")
    return f"{MEANINGS[key]}{lists} Default {default_text(key)}. Env {env}."


def _is_flag(token: str) -> bool:
    return token.startswith("-") and token.strip("-") != ""


def spegel_arguments(
    argv: Sequence[str],
) -> tuple[list[str], dict[str, list[str]], list[tuple[str, str]]]:
    """Spegel's command line, as its ``registry`` subcommand takes it, made into twistd's.

    Returns the arguments left for Twisted's parser, the list flags' values (every
    argument up to the next flag, and again for each repetition), and the Spegel flags
    accepted but ignored, with why. A bare boolean flag means true. A Spegel flag for
    something not supported raises UsageError naming it.
    """
    rest: list[str] = []
    lists: dict[str, list[str]] = {}
    ignored: list[tuple[str, str]] = []
    position = 0
    while position < len(argv):
        token = argv[position]
        position += 1
        if token == "--":
            rest.extend(argv[position - 1 :])
            break
        name, has_value, value = token.removeprefix("--").partition("=")
        if not token.startswith("--"):
            rest.append(token)
        elif name in LIST_KEYS:
            values = lists.setdefault(name, [])
            if has_value:
                values.extend([value] if value else [])
            while not has_value and position < len(argv) and not _is_flag(argv[position]):
                values.append(argv[position])
                position += 1
        elif name in BOOLEAN_KEYS and not has_value:
            bare = position == len(argv) or _is_flag(argv[position])
            rest.append(f"--{name}=true" if bare else token)
        elif name in REFUSED_SPEGEL_FLAGS:
            raise usage.UsageError(f"--{name}: {REFUSED_SPEGEL_FLAGS[name]}")
        elif name in IGNORED_SPEGEL_FLAGS:
            if name == "resolve-latest-tag" and value.lower() in ("false", "0", "f"):
                raise usage.UsageError(
                    "--resolve-latest-tag=false: use registry-filters ':latest$' instead"
                )
            takes_value = name != "resolve-latest-tag" and not has_value
            if takes_value and position < len(argv) and not _is_flag(argv[position]):
                position += 1
            ignored.append((f"--{name}", IGNORED_SPEGEL_FLAGS[name]))
        else:
            rest.append(token)
    return rest, lists, ignored


def startup_failure(error: ConfigError) -> SystemExit:
    """What every startup problem becomes: one line on stderr, exit status 1."""
    return SystemExit(f"spegel-tx: {error}")


class Options(usage.Options):
    synopsis = "[--config node.yaml] [--<key> value ...]"
    longdesc = (
        "Run a spegel-tx node (`spegel-tx registry` runs the same, in the foreground with "
        "JSON logs). Every key of node.yaml is also a flag of the same name and "
        "an environment variable (Spegel's names); flag > environment > file > default. "
        "Lists take Spegel's forms: flag values separated by spaces (or the flag repeated), "
        "comma-separated in the environment, a YAML list in the file. Of Spegel's other "
        "registry flags, --containerd-registry-config-path and --resolve-latest-tag are "
        "ignored with a warning; the --http-bootstrap-* flags are refused."
    )
    optParameters = [
        ["config", "c", None, "The node.yaml file; keys it leaves out keep their defaults."]
    ] + [[key, None, None, flag_help(key)] for key in KEYS]

    config: Config
    secret: bytes | None
    auth: BasicAuth | None

    def __init__(self) -> None:
        super().__init__()
        self.lists: dict[str, list[str]] = {}
        self.ignored: list[tuple[str, str]] = []

    def opt_version(self) -> NoReturn:
        """Print spegel-tx's version and exit."""
        print(f"spegel-tx {__version__}")
        sys.exit(0)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """An unknown or refused flag ends the process with one line, not twistd's
        whole usage text."""
        argv = sys.argv[1:] if options is None else options
        try:
            rest, self.lists, self.ignored = spegel_arguments(argv)
            super().parseOptions(rest)
        except usage.UsageError as e:
            raise SystemExit(f"spegel-tx: {e} (see --help)") from None

    def postOptions(self) -> None:
        flags = {key: self[key] for key in KEYS} | self.lists
        try:
            self.config = load_config(self["config"], os.environ, flags)
            self.secret = router_secret(self.config, os.environ)
            self.auth = basic_auth(self.config)
        except ConfigError as e:
            raise startup_failure(e) from None


def node_identity(data_dir: str) -> bytes:
    """The node's DHT id, kept in ``data-dir``; a directory it cannot use is a ConfigError."""
    try:
        return load_or_create_node_id(data_dir)
    except ValueError as e:
        raise ConfigError("data-dir", f"{e}: delete it to start with a new id") from e
    except OSError as e:
        raise ConfigError(
            "data-dir",
            f"cannot keep the node id in {data_dir}: {e.strerror}: make it a directory this "
            f"user (uid {os.getuid()}) can write, or leave data-dir empty",
        ) from e


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from spegel_tx.service import make_service
    from spegel_tx.shutdown import handle_sigterm

    logs.configure(options.config.log_level)
    for flag, why in options.ignored:
        _log.warn("{flag} {why}", flag=flag, why=why)
    try:
        node_id = node_identity(options.config.data_dir)
    except ConfigError as e:
        raise startup_failure(e) from None
    if options.auth is not None:
        _log.info(
            "every /v2/ request must carry Basic authentication (credentials from {username_file} "
            "and {password_file})",
            username_file=options.config.basic_auth_username_file,
            password_file=options.config.basic_auth_password_file,
        )
    node = make_service(
        options.config, reactor, secret=options.secret, node_id=node_id, auth=options.auth
    )
    handle_sigterm(reactor, node)
    return node
