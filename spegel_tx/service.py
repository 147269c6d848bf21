"""Wire the node's long-lived parts into one MultiService; nothing here runs on import."""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IResolver
from twisted.logger import Logger
from twisted.names import client as dns_client
from twisted.names.cache import CacheResolver
from twisted.names.hosts import Resolver as HostsResolver
from twisted.names.resolve import ResolverChain
from twisted.web.resource import Resource
from twisted.web.server import Site

from spegel_tx import __version__
from spegel_tx.basicauth import AuthorizedClient, BasicAuth
from spegel_tx.config import Address, Config, environment_name, parse_address
from spegel_tx.containerd.store import ContainerdStore
from spegel_tx.content import FirstWave
from spegel_tx.debug import DebugPages
from spegel_tx.debugweb import DebugWeb
from spegel_tx.interfaces import IBootstrapper
from spegel_tx.listeners import TCPListener, UDPListener
from spegel_tx.metrics import MetricsResource
from spegel_tx.nodemetrics import NodeMetrics
from spegel_tx.readiness import Readiness
from spegel_tx.reclaim import Reclaimer
from spegel_tx.registry.access import RegistrySite
from spegel_tx.registry.app import Registry
from spegel_tx.registry.connections import PeerClient, peer_agent
from spegel_tx.registry.mirror import Mirror, MirrorSettings
from spegel_tx.routing.addresses import NodeAddresses
from spegel_tx.routing.bootstrap import DNSBootstrapper, StaticBootstrapper
from spegel_tx.routing.kademlia.limits import Limits
from spegel_tx.routing.kademlia.protocol import KademliaProtocol
from spegel_tx.routing.kademlia.router import KademliaRouter
from spegel_tx.shutdown import GracefulNode
from spegel_tx.state import StateTracker

PEER_CONNECTIONS = 8
"""Kept-alive connections per peer: containerd fetches a pull's layers in parallel."""

_log = Logger()

STARTED = (
    "spegel-tx {version}: registry {registry}, router {router}, metrics {metrics}; "
    "containerd {containerd} namespace {containerd_namespace}; bootstrap {bootstrap}; {forwarding}"
)
"""The one line that says what a starting node is (its fields are ``node_facts``)."""


def node_facts(config: Config) -> dict[str, str]:
    """What the node is, as its startup line and its debug page show it."""
    if config.bootstrap_kind == "dns":
        bootstrap = f"dns {config.dns_bootstrap_domain}"
    else:
        peers = ", ".join(map(str, config.static_bootstrap_peers))
        bootstrap = f"static {peers or '(no peers)'}"
    return {
        "version": __version__,
        "registry": str(config.registry_addr),
        "router": f"{config.router_addr} (UDP)",
        "metrics": str(config.metrics_addr),
        "containerd": config.containerd_sock,
        "containerd_namespace": config.containerd_namespace,
        "bootstrap": bootstrap,
        "forwarding": "forwards what it lacks to peers"
        if config.forwards
        else "never forwards: no bootstrap peers, so it serves only its own content",
    }


def listen_failure(key: str, error: CannotListenError) -> str:
    """The line for a ``*-addr`` the node cannot listen on, with what to change."""
    address = Address(error.interface, error.port)
    code = getattr(error.socketError, "errno", None)
    change = f"set {key} ({environment_name(key)}) to"
    if code == errno.EADDRINUSE:
        problem = f"{address} is already in use: stop what listens there, or {change} a free one"
    elif code == errno.EADDRNOTAVAIL:
        problem = (
            f"{address} is not an address of this machine: {change} one of its addresses, "
            f"or :{error.port} for all of them"
        )
    elif code == errno.EACCES:
        problem = (
            f"not allowed to listen on {address}: ports below 1024 need root or "
            f"CAP_NET_BIND_SERVICE, or {change} a higher port"
        )
    else:
        reason = getattr(error.socketError, "strerror", None) or error.socketError
        problem = f"cannot listen on {address}: {reason}"
    return f"{key}: {problem}"


class Node(GracefulNode):
    """The node's services. Its listeners are named by their config key, so that an
    address it cannot listen on ends the start with one line naming the key; on stop it
    drains first (``shutdown.py``)."""

    def __init__(self, config: Config, clock: Any) -> None:
        super().__init__(clock, config.shutdown_grace_period)
        self._config = config

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        for service in self:
            try:
                service.privilegedStartService()
            except CannotListenError as e:
                raise SystemExit(f"spegel-tx: {listen_failure(str(service.name), e)}") from None

    def startService(self) -> None:
        super().startService()
        _log.info(STARTED, **node_facts(self._config))


DNS_SERVER_ENV = "SPEGEL_TX_DNS_SERVER"
"""``host:port`` of the one DNS server to ask instead of resolv.conf's: the DNS bootstrap
test runs its own server on a free port, which resolv.conf cannot name."""


def dns_resolver(reactor: Any, environ: Mapping[str, str] = os.environ) -> IResolver:
    """What ``createResolver`` builds (hosts file, cache, resolv.conf's servers), on
    ``reactor``: ``createResolver`` would schedule its work on the global one."""
    if environ.get(DNS_SERVER_ENV):
        server = parse_address(environ[DNS_SERVER_ENV])
        return dns_client.Resolver(servers=[(server.host, server.port)], reactor=reactor)
    return ResolverChain(
        [
            HostsResolver(b"/etc/hosts"),
            CacheResolver(reactor=reactor),
            dns_client.Resolver(b"/etc/resolv.conf", reactor=reactor),
        ]
    )


def make_bootstrapper(config: Config, reactor: Any) -> IBootstrapper:
    if config.bootstrap_kind == "dns":
        resolver = dns_resolver(reactor)
        return DNSBootstrapper(resolver, config.dns_bootstrap_domain, config.router_addr.port)
    return StaticBootstrapper(reactor, config.static_bootstrap_peers)


def mirror_settings(config: Config) -> MirrorSettings:
    return MirrorSettings(
        resolve_timeout=config.mirror_resolve_timeout,
        resolve_retries=config.mirror_resolve_retries,
        response_timeout=config.mirror_response_timeout,
        idle_timeout=config.mirror_idle_timeout,
        quarantine=config.mirror_peer_quarantine,
        resume_timeout=config.mirror_resume_timeout,
        follow_downloads=config.first_wave_sharing == FirstWave.IN_FLIGHT.value,
        min_throughput=config.mirror_min_throughput,
    )


def peer_client(
    config: Config, reactor: Any, addresses: NodeAddresses, auth: BasicAuth | None = None
) -> PeerClient | AuthorizedClient:
    """One persistent connection pool to all peers, so a pull's many blobs reuse
    connections; a peer is reached at any address ``addresses`` knows for it. With
    ``auth``, every request carries the credentials the peers' registries ask for."""
    agent = peer_agent(reactor, config.mirror_connect_timeout, PEER_CONNECTIONS, addresses.hosts_of)
    client = PeerClient(agent)
    return client if auth is None else AuthorizedClient(client, auth)


def make_service(
    config: Config,
    reactor: Any,
    *,
    secret: bytes | None,
    node_id: bytes,
    auth: BasicAuth | None = None,
) -> Node:
    """Children stop in reverse order: the router withdraws while its UDP port still listens.

    ``secret``, ``node_id`` and ``auth`` were read and checked before (``tap.py``): nothing
    here fails.
    """
    node = Node(config, reactor)
    metrics = NodeMetrics(reactor, config.mirrored_registries)
    store = ContainerdStore(
        reactor,
        address=config.containerd_sock,
        namespace=config.containerd_namespace,
        content_path=config.containerd_content_path,
        stall_timeout=config.in_flight_stall_timeout,
    )
    store.setServiceParent(node)

    protocol = KademliaProtocol(
        reactor,
        node_id,
        registry_port=config.registry_addr.port,
        secret=secret,
        record_ttl=config.router_record_ttl,
        limits=Limits(
            records=config.router_max_records,
            records_per_host=config.router_max_records_per_host,
        ),
    )
    udp = UDPListener(reactor, config.router_addr, protocol)
    udp.setName("router-addr")
    udp.setServiceParent(node)
    router = KademliaRouter(
        reactor,
        protocol,
        make_bootstrapper(config, reactor),
        config.router_addr.port,
        republish_interval=config.router_republish_interval,
    )
    router.setServiceParent(node)
    metrics.watch_dht(protocol)
    first_wave = FirstWave(config.first_wave_sharing)
    tracker = StateTracker(
        reactor,
        store,
        router,
        config.mirrored_registries,
        config.registry_filters,
        first_wave=first_wave,
    )
    tracker.setServiceParent(node)
    metrics.watch_state(tracker)

    client = peer_client(config, reactor, protocol.addresses, auth)
    settings = mirror_settings(config)
    mirror = None
    if config.forwards:
        mirror = Mirror(reactor, router, client, settings, metrics=metrics)
        metrics.watch_mirror(mirror)
        # A peer whose router speaks is up again, whatever its last request said.
        protocol.on_peer_seen = mirror.health.alive
    readiness = Readiness(store, router if config.forwards else None, lambda: node.stopping)
    registry = Registry(
        reactor,
        store,
        config.mirrored_registries,
        config.registry_filters,
        mirror=mirror,
        readiness=readiness,
        auth=auth,
        serve_downloads=first_wave is FirstWave.IN_FLIGHT,
    )
    registry_site = RegistrySite(registry.resource(), metrics, Reclaimer(reactor))
    listener = _listen(node, "registry-addr", config.registry_addr, registry_site, reactor)
    node.drains(registry_site, listener, tracker, router)
    web = None
    if config.debug_web_enabled:
        facts = node_facts(config)
        web = DebugWeb(
            reactor, router, router.protocol, tracker, metrics, client, settings, readiness, facts
        ).resource()
    pages = DebugPages(reactor, router, readiness, web)
    # Requests here are logged as the registry's are, but count in no registry metric;
    # the debug page's measure form posts a body.
    metrics_site = RegistrySite(metrics_root(metrics, pages), reads_bodies=True)
    _listen(node, "metrics-addr", config.metrics_addr, metrics_site, reactor)
    return node


def _listen(
    node: MultiService, key: str, address: Address, site: Site, reactor: Any
) -> TCPListener:
    listener = TCPListener(reactor, address, site)
    listener.setName(key)
    listener.setServiceParent(node)
    return listener


def metrics_root(metrics: NodeMetrics, debug: DebugPages) -> Resource:
    """The metrics address: ``/metrics`` for Prometheus, ``/debug/...`` for people."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics.registry))
    root.putChild(b"debug", debug.resource())
    return root
