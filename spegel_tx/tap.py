"""``twistd spegel``: parse options into a Config and build the node's service."""

from __future__ import annotations

import os

from twisted.application.service import IService
from twisted.python import usage

from spegel_tx import logs
from spegel_tx.config import KEYS, Config, environment_name, load_config
from spegel_tx.errors import ConfigError


class Options(usage.Options):
    synopsis = "[--config node.yaml] [--<key> value ...]"
    longdesc = (
        "Run a spegel-tx node. Every key of node.yaml can be given as a flag of the same "
        "name or as Spegel's environment variable; flag > environment > file > default."
    )
    optParameters = [["config", "c", None, "Path of the node.yaml configuration file."]] + [
        [key, None, None, f"Overrides `{key}` (env {environment_name(key)})."] for key in KEYS
    ]

    config: Config

    def postOptions(self) -> None:
        """A bad configuration ends the process with one line naming the key;
        twistd would otherwise print its whole usage text around it."""
        try:
            self.config = load_config(self["config"], os.environ, {key: self[key] for key in KEYS})
        except ConfigError as e:
            raise SystemExit(f"spegel-tx: invalid configuration: {e}") from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from spegel_tx.service import make_service
    from spegel_tx.shutdown import handle_sigterm

    logs.configure(options.config.log_level)
    node = make_service(options.config, reactor)
    handle_sigterm(reactor, node)
    return node
