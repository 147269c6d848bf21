"""What an operator types and reads when a node starts, without sockets.

The command line in Spegel's forms (a Spegel DaemonSet's arguments as they are), the
one-line failures, the facts of the startup line, and the service built on a
``MemoryReactorClock``. The real processes are in tests/integration/test_operator.py.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.scripts.twistd import ServerOptions

from spegel_tx import __version__, cli
from spegel_tx.config import KEYS, Address, Config, default_text, environment_name, load_config
from spegel_tx.errors import ConfigError
from spegel_tx.service import Node, listen_failure, make_service, node_facts
from spegel_tx.tap import Options, node_identity, spegel_arguments

README = Path(__file__).resolve().parents[2] / "README.md"

SPEGEL_DAEMONSET_ARGS = [
    "--log-level=INFO",
    "--mirror-resolve-retries=3",
    "--mirror-resolve-timeout=20ms",
    "--registry-addr=:5000",
    "--router-addr=:5001",
    "--metrics-addr=:9090",
    "--mirrored-registries",
    "https://docker.io",
    "https://ghcr.io",
    "--containerd-sock=/run/containerd/containerd.sock",
    "--containerd-namespace=k8s.io",
    "--bootstrap-kind=dns",
    "--dns-bootstrap-domain=spegel-bootstrap.spegel.svc.cluster.local.",
    "--registry-filters",
    ":latest$",
    "^docker.io/library/x{1,3}:",
    "--containerd-content-path=/var/lib/containerd/io.containerd.content.v1.content",
    "--debug-web-enabled=true",
    "--data-dir=/var/lib/spegel",
]
"""The registry container's arguments in Spegel's chart (v0.7), with its values filled in."""


@pytest.fixture(autouse=True)
def no_node_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in KEYS:
        monkeypatch.delenv(environment_name(key), raising=False)
    monkeypatch.delenv("ROUTER_SECRET", raising=False)


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def failure_of(*args: str) -> str:
    with pytest.raises(SystemExit) as caught:
        parse(*args)
    return str(caught.value.code)


# --- the command line ---------------------------------------------------------------------------


def test_a_spegel_daemonset_command_line_configures_the_node() -> None:
    config = parse(*SPEGEL_DAEMONSET_ARGS).config
    assert config.mirrored_registries == ("docker.io", "ghcr.io")
    assert [p.pattern for p in config.registry_filters] == [
        ":latest$",
        "^docker.io/library/x{1,3}:",
    ]
    assert (config.bootstrap_kind, config.dns_bootstrap_domain) == (
        "dns",
        "spegel-bootstrap.spegel.svc.cluster.local.",
    )
    assert config.debug_web_enabled and config.data_dir == "/var/lib/spegel"
    assert config.forwards


def test_spegel_tx_registry_and_twistd_spegel_read_arguments_alike() -> None:
    via_twistd = ServerOptions()
    via_twistd.parseOptions(["--nodaemon", "spegel", *SPEGEL_DAEMONSET_ARGS])
    via_registry = ServerOptions()
    via_registry.parseOptions([*cli.REGISTRY_ARGUMENTS, "spegel", *SPEGEL_DAEMONSET_ARGS])
    assert via_registry.subOptions.config == via_twistd.subOptions.config
    assert (via_registry["nodaemon"], via_registry["pidfile"]) == (True, "")


def test_list_flags_take_values_separated_by_spaces_or_repeated() -> None:
    config = parse(
        "--static-bootstrap-peers",
        "10.0.0.2:5001",
        "10.0.0.3:5001",
        "--static-bootstrap-peers=10.0.0.4:5001",
        "--registry-addr",
        ":5000",
    ).config
    assert config.static_bootstrap_peers == (
        Address("10.0.0.2", 5001),
        Address("10.0.0.3", 5001),
        Address("10.0.0.4", 5001),
    )
    assert config.registry_addr == Address("", 5000)


def test_list_environment_variables_are_comma_separated_with_quotes_for_commas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STATIC_BOOTSTRAP_PEERS", "10.0.0.2:5001, 10.0.0.3:5001")
    monkeypatch.setenv("REGISTRY_FILTERS", '":v[0-9]{1,2}$",:latest$')
    config = parse().config
    assert config.static_bootstrap_peers == (Address("10.0.0.2", 5001), Address("10.0.0.3", 5001))
    assert [p.pattern for p in config.registry_filters] == [":v[0-9]{1,2}$", ":latest$"]


def test_a_comma_in_a_flag_value_is_part_of_it() -> None:
    """As in Spegel: a regular expression keeps its commas; two addresses in one value
    are refused, not misread."""
    assert [p.pattern for p in parse("--registry-filters=x{1,3}").config.registry_filters] == [
        "x{1,3}"
    ]
    assert failure_of("--static-bootstrap-peers", "10.0.0.2:5001,10.0.0.3:5001") == (
        "spegel-tx: static-bootstrap-peers: '10.0.0.2:5001,10.0.0.3:5001' is more than one "
        "address: give each as its own item (from --static-bootstrap-peers)"
    )


def test_a_bare_boolean_flag_means_true() -> None:
    assert parse("--debug-web-enabled", "--log-level=DEBUG").config.debug_web_enabled
    assert not parse("--debug-web-enabled=false").config.debug_web_enabled


def test_the_grammar_leaves_other_flags_to_twisted() -> None:
    rest, lists, ignored = spegel_arguments(
        ["-c", "node.yaml", "--mirrored-registries", "a", "b", "--log-level", "INFO"]
    )
    assert rest == ["-c", "node.yaml", "--log-level", "INFO"]
    assert lists == {"mirrored-registries": ["a", "b"]}
    assert ignored == []
    assert spegel_arguments(["--mirrored-registries"])[1] == {"mirrored-registries": []}


def test_spegel_flags_that_change_nothing_here_are_accepted_with_a_warning() -> None:
    options = parse(
        "--containerd-registry-config-path",
        "/etc/containerd/certs.d",
        "--resolve-latest-tag=true",
        "--registry-addr=:5000",
    )
    assert [flag for flag, _ in options.ignored] == [
        "--containerd-registry-config-path",
        "--resolve-latest-tag",
    ]
    assert options.config.registry_addr == Address("", 5000)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--http-bootstrap-url=http://10.0.0.2:5001/id"],
            "spegel-tx: --http-bootstrap-url: HTTP bootstrap is not supported: use "
            "bootstrap-kind dns or static (see --help)",
        ),
        (
            ["--resolve-latest-tag=false"],
            "spegel-tx: --resolve-latest-tag=false: use registry-filters ':latest$' instead "
            "(see --help)",
        ),
        (["--registry-adr=:5000"], "spegel-tx: option --registry-adr not recognized (see --help)"),
    ],
)
def test_a_flag_that_cannot_be_honoured_is_one_line(args: list[str], line: str) -> None:
    assert failure_of(*args) == line


def test_version_is_ours(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse("--version")
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"spegel-tx {__version__}\n"


def test_help_gives_each_flag_its_meaning_default_and_environment_variable() -> None:
    text = "".join(str(Options()).split())  # Twisted wraps long words too
    for key in KEYS:
        assert f"--{key}=" in text
        assert f"Default{default_text(key)}." in text, key
        assert f"Env{environment_name(key)}" in text, key
    assert "Overrides" not in text


def test_the_readme_table_agrees_with_the_flags() -> None:
    """Key, environment variable and default of every row, as --help gives them."""
    rows = re.findall(
        r"^\| `([a-z-]+)` \| `([A-Z_]+)`[^|]* \| ([^|]+) \|", README.read_text(), re.MULTILINE
    )
    table = {key: (env, default.strip().strip("`")) for key, env, default in rows}
    assert table == {key: (environment_name(key), default_text(key)) for key in KEYS}


def test_spegel_tx_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "registry" in text


# --- one line for each startup failure ----------------------------------------------------------


def test_a_bad_environment_value_names_the_key_and_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REGISTRY_ADDR", "nope")
    assert failure_of() == (
        "spegel-tx: registry-addr: 'nope' has no port; write host:port or :port "
        "(from REGISTRY_ADDR)"
    )


def test_an_unreadable_secret_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert failure_of(f"--router-secret-file={missing}").startswith(
        f"spegel-tx: router-secret-file: cannot read {missing}: No such file or directory: "
        "make it a file this user"
    )


def test_a_short_secret_in_the_environment_is_refused_as_in_the_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ROUTER_SECRET", "too-short")
    assert failure_of().startswith(
        "spegel-tx: ROUTER_SECRET: holds 9 bytes, a cluster secret needs 16 or more"
    )


def test_a_data_dir_that_cannot_be_used_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as caught:
        node_identity(str(blocker / "data"))
    assert str(caught.value).startswith(
        f"data-dir: cannot keep the node id in {blocker / 'data'}: Not a directory: "
        "make it a directory this user"
    )
    (tmp_path / "node-id").write_text("not an id\n")
    with pytest.raises(ConfigError, match=r"^data-dir: .*node-id does not hold .* new id$"):
        node_identity(str(tmp_path))


@pytest.mark.parametrize(
    ("code", "line"),
    [
        (
            errno.EADDRINUSE,
            "registry-addr: 127.0.0.1:5000 is already in use: stop what listens there, or set "
            "registry-addr (REGISTRY_ADDR) to a free one",
        ),
        (
            errno.EADDRNOTAVAIL,
            "registry-addr: 127.0.0.1:5000 is not an address of this machine: set registry-addr "
            "(REGISTRY_ADDR) to one of its addresses, or :5000 for all of them",
        ),
        (
            errno.EACCES,
            "registry-addr: not allowed to listen on 127.0.0.1:5000: ports below 1024 need root "
            "or CAP_NET_BIND_SERVICE, or set registry-addr (REGISTRY_ADDR) to a higher port",
        ),
    ],
)
def test_an_address_the_node_cannot_listen_on_is_one_line(code: int, line: str) -> None:
    error = CannotListenError("127.0.0.1", 5000, OSError(code, "whatever the OS says"))
    assert listen_failure("registry-addr", error) == line


# --- the service --------------------------------------------------------------------------------


class NodeReactor(MemoryReactorClock):
    """A MemoryReactorClock that also listens on UDP, and refuses one TCP port."""

    def __init__(self, busy_port: int | None = None) -> None:
        super().__init__()
        self.busy_port = busy_port
        self.udp: list[tuple[int, Any, str]] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", *_: Any) -> object:
        self.udp.append((port, protocol, interface))
        return object()

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port == self.busy_port:
            raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "in use"))
        return super().listenTCP(port, factory, backlog, interface)


def config(**keys: Any) -> Config:
    base = {"registry-addr": "127.0.0.5:5000", "router-addr": "127.0.0.5:5001"}
    return load_config(None, environ={}, flags=base | {"metrics-addr": "127.0.0.5:9090"} | keys)


def build(reactor: NodeReactor, **keys: Any) -> Node:
    node = make_service(config(**keys), reactor, secret=None, node_id=b"\x07" * 32)
    assert isinstance(node, Node)
    return node


def test_the_service_builds_and_listens_on_the_configured_addresses() -> None:
    reactor = NodeReactor()
    build(reactor).privilegedStartService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (5000, "127.0.0.5"),
        (9090, "127.0.0.5"),
    ]
    assert [(port, interface) for port, _, interface in reactor.udp] == [(5001, "127.0.0.5")]


def test_dns_bootstrap_resolves_on_the_node_reactor() -> None:
    from twisted.internet import reactor as global_reactor

    before = len(global_reactor.getDelayedCalls())
    reactor = NodeReactor()
    build(reactor, **{"bootstrap-kind": "dns", "dns-bootstrap-domain": "peers.test"})
    assert len(global_reactor.getDelayedCalls()) == before
    assert reactor.getDelayedCalls(), "the resolver re-reads resolv.conf on the node's clock"


def test_dns_bootstrap_asks_the_server_the_environment_names() -> None:
    """SPEGEL_TX_DNS_SERVER, for tests that run their own DNS server on a free port."""
    from twisted.names.client import Resolver

    from spegel_tx.service import dns_resolver

    resolver = dns_resolver(NodeReactor(), {"SPEGEL_TX_DNS_SERVER": "127.0.0.9:5353"})
    assert isinstance(resolver, Resolver)
    assert resolver.servers == [("127.0.0.9", 5353)]


def test_a_port_in_use_ends_the_start_with_one_line() -> None:
    node = build(NodeReactor(busy_port=9090))
    with pytest.raises(SystemExit) as caught:
        node.privilegedStartService()
    assert caught.value.code == (
        "spegel-tx: metrics-addr: 127.0.0.5:9090 is already in use: stop what listens there, "
        "or set metrics-addr (METRICS_ADDR) to a free one"
    )


def test_the_facts_of_the_startup_line() -> None:
    alone = node_facts(config())
    assert alone == {
        "version": __version__,
        "registry": "127.0.0.5:5000",
        "router": "127.0.0.5:5001 (UDP)",
        "metrics": "127.0.0.5:9090",
        "containerd": "/run/containerd/containerd.sock",
        "containerd_namespace": "k8s.io",
        "bootstrap": "static (no peers)",
        "forwarding": "never forwards: no bootstrap peers, so it serves only its own content",
    }
    peers = node_facts(config(**{"static-bootstrap-peers": ["10.0.0.2:5001", "10.0.0.3:5001"]}))
    assert peers["bootstrap"] == "static 10.0.0.2:5001, 10.0.0.3:5001"
    assert peers["forwarding"] == "forwards what it lacks to peers"
    dns = node_facts(config(**{"bootstrap-kind": "dns", "dns-bootstrap-domain": "peers.test"}))
    assert (dns["bootstrap"], dns["forwarding"]) == ("dns peers.test", peers["forwarding"])
