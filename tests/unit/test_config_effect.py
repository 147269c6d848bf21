"""Every configuration key takes effect: the node is built as ``twistd spegel`` builds it
(``Options`` then ``makeService``), on a ``MemoryReactorClock``, with one key set to a
value other than its default, and the part that uses the key is shown to have it.

A key in MEANINGS without a row in CHECKS fails ``test_every_key_has_a_check``: a new
key must come with proof that it reaches what it configures.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import twisted.internet
from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.names import dns

from spegel_tx import logs, service, tap
from spegel_tx.config import KEYS, MEANINGS, Config, environment_name
from spegel_tx.content import FirstWave
from spegel_tx.registry.peers import Fault
from spegel_tx.routing.kademlia.node import load_or_create_node_id
from tests.unit.test_startup import NodeReactor

SPIED = (
    "ContainerdStore",
    "KademliaProtocol",
    "KademliaRouter",
    "StateTracker",
    "Mirror",
    "Registry",
)
"""What ``make_service`` builds that the checks look into."""

PEER = ("10.9.9.9", 5000)


@dataclass
class Built:
    """A node built from flags, and the parts it was built from."""

    reactor: NodeReactor
    node: Any
    options: tap.Options
    parts: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        return self.parts[name]

    def listening(self) -> list[tuple[str, int, int]]:
        """(kind, interface, port) of each socket the node listens on once started."""
        self.node.privilegedStartService()
        tcp = [("tcp", interface, port) for port, _, _, interface in self.reactor.tcpServers]
        udp = [("udp", interface, port) for port, _, interface in self.reactor.udp]
        return tcp + udp

    def site(self, key: str) -> Any:
        return self.node.getServiceNamed(key).factory


class AnsweringResolver:
    """A DNS resolver that gives 10.0.0.7 for every name and notes each name asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def lookupAddress(self, name: str) -> Any:
        self.asked.append(name)
        record = dns.RRHeader(name, dns.A, payload=dns.Record_A("10.0.0.7"))
        return succeed(([record], [], []))

    def lookupIPV6Address(self, name: str) -> Any:
        return succeed(([], [], []))


def bootstrap_peers(built: Built) -> list[tuple[str, int]]:
    found: list[Any] = []
    built.KademliaRouter._bootstrapper.peers().addBoth(found.append)
    (peers,) = found
    return peers


def connect_timeout(built: Built) -> float:
    """The timeout of the TCP connection the mirror's client opens to a peer."""
    built.Mirror._client.get("http://10.9.9.9:5000/v2/")
    (_, _, _, timeout, _) = built.reactor.tcpClients[-1]
    return timeout


def debug_web_status(built: Built) -> int:
    responses: list[Any] = []
    site = built.site("metrics-addr")
    StubTreq(site.resource).get("http://node/debug/web/").addBoth(responses.append)
    return responses[0].code


def quarantine_ends_after(built: Built, seconds: float) -> bool:
    """A peer that refused is quarantined until ``seconds`` have passed, and no longer."""
    health, clock = built.Mirror.health, built.reactor
    health.charge(PEER, Fault.UNREACHABLE)
    clock.advance(seconds - 0.01)
    held = health.quarantined(PEER)
    clock.advance(0.01)
    return held and not health.quarantined(PEER)


def logs_debug(built: Built, capsys: pytest.CaptureFixture[str]) -> bool:
    """Whether the JSON logger twistd builds after makeService writes a debug event."""
    capsys.readouterr()
    logs.json_observer()(
        {"log_level": logs.LogLevel.debug, "log_format": "probe", "log_namespace": "t"}
    )
    return "probe" in capsys.readouterr().out


SECRET = "a-cluster-secret-of-32-bytes-ok!"

FORWARDING = ("--static-bootstrap-peers", "10.0.0.8:5001")
"""Without peers a node builds no mirror; the mirror's keys need one."""

CREDENTIALS = {b"authorization": [b"Basic " + base64.b64encode(b"puller:s3cret")]}


def write_credentials(tmp: Path) -> bool:
    (tmp / "username").write_text("puller")
    (tmp / "password").write_text("s3cret")
    return True


def registry_status(built: Built, headers: dict[bytes, list[bytes]] | None = None) -> int:
    """The status of ``GET /v2/`` on the registry address, with ``headers``."""
    responses: list[Any] = []
    site = built.site("registry-addr")
    StubTreq(site.resource).get("http://node/v2/", headers=headers).addBoth(responses.append)
    return int(responses[0].code)


@dataclass(frozen=True)
class Check:
    value: str | Callable[[Path], str]
    """The flag's value: not the default (a callable gets a temporary directory)."""
    holds: Callable[..., bool]
    """Given the Built node (and capsys if it names it), whether the value took effect."""
    also: tuple[str, ...] = ()
    """Other flags the key needs to mean anything."""


CHECKS: dict[str, Check] = {
    "registry-addr": Check("127.0.0.5:5500", lambda b: ("tcp", "127.0.0.5", 5500) in b.listening()),
    "router-addr": Check(
        "127.0.0.5:5501",
        lambda b: (
            ("udp", "127.0.0.5", 5501) in b.listening() and b.KademliaRouter._router_port == 5501
        ),
    ),
    "metrics-addr": Check("127.0.0.5:9590", lambda b: ("tcp", "127.0.0.5", 9590) in b.listening()),
    "containerd-sock": Check(
        "/x/containerd.sock", lambda b: b.ContainerdStore.address == "/x/containerd.sock"
    ),
    "containerd-namespace": Check("other", lambda b: b.ContainerdStore.namespace == "other"),
    "containerd-content-path": Check(
        "/x/content", lambda b: b.ContainerdStore.content_path == "/x/content"
    ),
    "bootstrap-kind": Check(
        "dns",
        lambda b: bootstrap_peers(b) == [("10.0.0.7", 5001)],
        also=("--dns-bootstrap-domain", "peers.test"),
    ),
    "static-bootstrap-peers": Check(
        "10.0.0.8:5009",
        lambda b: bootstrap_peers(b) == [("10.0.0.8", 5009)] and b.Mirror is not None,
    ),
    "dns-bootstrap-domain": Check(
        "peers.example",
        lambda b: bootstrap_peers(b) and b.resolver.asked == ["peers.example"],
        also=("--bootstrap-kind", "dns"),
    ),
    "mirrored-registries": Check(
        "https://quay.io",
        lambda b: (
            b.StateTracker._filters.mirrored_registries == {"quay.io"}
            and b.Mirror.metrics.registry_label("ghcr.io") == "other"
            and b.Mirror.metrics.registry_label("quay.io") == "quay.io"
        ),
        also=("--static-bootstrap-peers", "10.0.0.8:5001"),
    ),
    "registry-filters": Check(
        ":latest$",
        lambda b: [p.pattern for p in b.StateTracker._filters.patterns] == [":latest$"],
    ),
    "mirror-resolve-timeout": Check(
        "70ms", lambda b: b.Mirror.settings.resolve_timeout == pytest.approx(0.07)
    ),
    "mirror-resolve-retries": Check("7", lambda b: b.Mirror.settings.resolve_retries == 7),
    "mirror-connect-timeout": Check("3s", lambda b: connect_timeout(b) == 3.0),
    "mirror-response-timeout": Check("9s", lambda b: b.Mirror.settings.response_timeout == 9.0),
    "mirror-idle-timeout": Check("11s", lambda b: b.Mirror.settings.idle_timeout == 11.0),
    "mirror-peer-quarantine": Check("45s", lambda b: quarantine_ends_after(b, 45.0)),
    "mirror-resume-timeout": Check("13s", lambda b: b.Mirror.settings.resume_timeout == 13.0),
    "mirror-min-throughput": Check(
        "3MiB", lambda b: b.Mirror.settings.min_throughput == 3 * 1024 * 1024
    ),
    "shutdown-grace-period": Check("7s", lambda b: b.node.grace_period == 7.0),
    "first-wave-sharing": Check(
        "committed",
        lambda b: (
            b.StateTracker.first_wave is FirstWave.COMMITTED
            and not b.Mirror.settings.follow_downloads
            and b.Registry._downloads is None
        ),
        also=FORWARDING,
    ),
    "in-flight-stall-timeout": Check("8s", lambda b: b.ContainerdStore.stall_timeout == 8.0),
    "basic-auth-username-file": Check(
        lambda tmp: write_credentials(tmp) and str(tmp / "username"),
        lambda b: registry_status(b) == 401 and registry_status(b, CREDENTIALS) == 200,
        also=("--basic-auth-password-file", "{tmp}/password"),
    ),
    "basic-auth-password-file": Check(
        lambda tmp: write_credentials(tmp) and str(tmp / "password"),
        lambda b: registry_status(b) == 401 and registry_status(b, CREDENTIALS) == 200,
        also=("--basic-auth-username-file", "{tmp}/username"),
    ),
    "data-dir": Check(
        lambda tmp: str(tmp),
        lambda b: b.KademliaProtocol.node_id == load_or_create_node_id(b.options.config.data_dir),
    ),
    "log-level": Check("DEBUG", lambda b, capsys: logs_debug(b, capsys)),
    "debug-web-enabled": Check("true", lambda b: debug_web_status(b) == 200),
    "router-secret-file": Check(
        lambda tmp: (tmp / "secret").write_text(SECRET + "\n") and str(tmp / "secret"),
        lambda b: b.KademliaProtocol.secret == SECRET.encode(),
    ),
    "router-record-ttl": Check("25m", lambda b: b.KademliaProtocol.records.ttl == 1500.0),
    "router-republish-interval": Check(
        "10m", lambda b: b.KademliaRouter._republish_interval == 600.0
    ),
    "router-max-records": Check("30000", lambda b: b.KademliaProtocol.limits.records == 30000),
    "router-max-records-per-host": Check(
        "70", lambda b: b.KademliaProtocol.limits.records_per_host == 70
    ),
}


def build(monkeypatch: pytest.MonkeyPatch, argv: list[str], resolver: AnsweringResolver) -> Built:
    for key in KEYS:
        monkeypatch.delenv(environment_name(key), raising=False)
    monkeypatch.delenv("ROUTER_SECRET", raising=False)
    reactor = NodeReactor()
    monkeypatch.setattr(twisted.internet, "reactor", reactor)
    monkeypatch.setattr(logs, "_level", logs._level)
    monkeypatch.setattr(service, "dns_resolver", lambda _: resolver)
    parts: dict[str, Any] = {"resolver": resolver, "Mirror": None}
    for name in SPIED:
        monkeypatch.setattr(service, name, _spy(getattr(service, name), name, parts))
    options = tap.Options()
    options.parseOptions(argv)
    node = tap.makeService(options)
    return Built(reactor, node, options, parts)


def _spy(made: Callable[..., Any], name: str, parts: dict[str, Any]) -> Callable[..., Any]:
    def make(*args: Any, **kwargs: Any) -> Any:
        parts[name] = made(*args, **kwargs)
        return parts[name]

    return make


def test_every_key_has_a_check() -> None:
    unchecked = sorted(set(MEANINGS) - set(CHECKS))
    assert not unchecked, (
        f"no test shows that {', '.join(unchecked)} takes effect: add a row to CHECKS in "
        f"{Path(__file__).name} that builds the node with it and looks where it is used"
    )
    assert sorted(CHECKS) == sorted(MEANINGS), "a row in CHECKS for a key that is gone"


@pytest.mark.parametrize("key", sorted(MEANINGS))
def test_each_key_reaches_the_part_that_uses_it(
    key: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    check = CHECKS.get(key)
    if check is None:
        pytest.fail(f"{key}: no row in CHECKS shows that it takes effect")
    value = check.value(tmp_path) if callable(check.value) else check.value
    argv = [f"--{key}", value, *(flag.format(tmp=tmp_path) for flag in check.also)]
    if "--static-bootstrap-peers" not in argv and "--bootstrap-kind" not in argv:
        argv += FORWARDING
    built = build(monkeypatch, argv, AnsweringResolver())
    attribute = key.replace("-", "_")
    assert getattr(built.options.config, attribute) != getattr(Config(), attribute), (
        f"{key}: the check's value {value!r} is the default, so it proves nothing"
    )
    arguments = ("b", "capsys")[: check.holds.__code__.co_argcount]
    given = {"b": built, "capsys": capsys}
    assert check.holds(*(given[name] for name in arguments)), f"{key}={value!r} did not take effect"


def test_the_mirror_the_service_builds_keeps_the_readmes_fixed_limits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README, How a pull is served: HEAD and manifests 404 after 3 s; a wrong digest
    puts the peer last for 10 minutes; a full walk of every image every 5 minutes."""
    built = build(monkeypatch, list(FORWARDING), AnsweringResolver())
    assert built.Mirror.settings.manifest_budget == 3.0
    health, clock = built.Mirror.health, built.reactor
    health.charge(PEER, Fault.LIED)
    health.alive(PEER)
    clock.advance(10 * 60 - 0.01)
    assert health.quarantined(PEER), "a liar stays last for 10 minutes, seen alive or not"
    clock.advance(0.01)
    assert not health.quarantined(PEER), "and no longer"
    assert built.StateTracker._resync_interval == 5 * 60.0
