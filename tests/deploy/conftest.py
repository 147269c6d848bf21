"""What twistd makes of a deployed daemon command line, shared by the chart and systemd tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from twisted.scripts.twistd import ServerOptions

from spegel_tx import logs
from spegel_tx.config import KEYS, Config, environment_name


@pytest.fixture
def twistd_config(monkeypatch: pytest.MonkeyPatch) -> Callable[[Sequence[str]], Config]:
    """Parse ``twistd ...`` arguments exactly as twistd would at start, and return the
    ``spegel`` subcommand's Config: the node.yaml it names has been loaded and checked.

    The test's own environment is cleared of the node's variables first, so only the
    command line and the file count.
    """
    for key in KEYS:
        monkeypatch.delenv(environment_name(key), raising=False)
    monkeypatch.delenv("ROUTER_SECRET", raising=False)

    def parse(args: Sequence[str]) -> Config:
        options = ServerOptions()
        options.parseOptions(list(args))
        assert options["nodaemon"], "a supervisor (kubelet, systemd) needs it in the foreground"
        assert options["pidfile"] == "", "the root file system is read-only: no twistd.pid"
        assert options["logger"] is logs.json_observer, "one JSON object per log line"
        assert options.subCommand == "spegel"
        config: Config = options.subOptions.config
        return config

    return parse
