"""Wire the node's long-lived parts into one MultiService; nothing here runs on import."""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.application.internet import TCPServer, UDPServer
from twisted.application.service import MultiService
from twisted.names import client as dns_client
from twisted.web.resource import Resource
from twisted.web.server import Site

from spegel_tx.config import Config, router_secret
from spegel_tx.containerd.store import ContainerdStore
from spegel_tx.debug import DebugPages
from spegel_tx.debugweb import DebugWeb
from spegel_tx.interfaces import IBootstrapper
from spegel_tx.metrics import MetricsResource
from spegel_tx.nodemetrics import NodeMetrics
from spegel_tx.registry.access import RegistrySite
from spegel_tx.registry.app import Registry
from spegel_tx.registry.connections import peer_agent
from spegel_tx.registry.mirror import Mirror, MirrorSettings
from spegel_tx.routing.bootstrap import DNSBootstrapper, StaticBootstrapper
from spegel_tx.routing.kademlia.limits import Limits
from spegel_tx.routing.kademlia.node import load_or_create_node_id
from spegel_tx.routing.kademlia.protocol import KademliaProtocol
from spegel_tx.routing.kademlia.router import KademliaRouter
from spegel_tx.state import StateTracker

PEER_CONNECTIONS = 8
"""Kept-alive connections per peer: containerd fetches a pull's layers in parallel."""


def make_bootstrapper(config: Config, reactor: Any) -> IBootstrapper:
    if config.bootstrap_kind == "dns":
        resolver = dns_client.createResolver()
        return DNSBootstrapper(resolver, config.dns_bootstrap_domain, config.router_addr.port)
    return StaticBootstrapper(reactor, config.static_bootstrap_peers)


def mirror_settings(config: Config) -> MirrorSettings:
    return MirrorSettings(
        resolve_timeout=config.mirror_resolve_timeout,
        resolve_retries=config.mirror_resolve_retries,
        response_timeout=config.mirror_response_timeout,
        idle_timeout=config.mirror_idle_timeout,
        quarantine=config.mirror_peer_quarantine,
    )


def peer_client(config: Config, reactor: Any) -> HTTPClient:
    """One persistent connection pool to all peers, so a pull's many blobs reuse connections."""
    return HTTPClient(peer_agent(reactor, config.mirror_connect_timeout, PEER_CONNECTIONS))


def make_service(config: Config, reactor: Any) -> MultiService:
    """Children stop in reverse order: the router withdraws while its UDP port still listens."""
    node = MultiService()
    metrics = NodeMetrics(reactor)
    store = ContainerdStore(
        reactor,
        address=config.containerd_sock,
        namespace=config.containerd_namespace,
        content_path=config.containerd_content_path,
    )
    store.setServiceParent(node)

    protocol = KademliaProtocol(
        reactor,
        load_or_create_node_id(config.data_dir),
        registry_port=config.registry_addr.port,
        secret=router_secret(config),
        record_ttl=config.router_record_ttl,
        limits=Limits(
            records=config.router_max_records,
            records_per_host=config.router_max_records_per_host,
        ),
    )
    UDPServer(
        config.router_addr.port, protocol, interface=config.router_addr.host, reactor=reactor
    ).setServiceParent(node)
    router = KademliaRouter(
        reactor,
        protocol,
        make_bootstrapper(config, reactor),
        config.router_addr.port,
        republish_interval=config.router_republish_interval,
    )
    router.setServiceParent(node)
    metrics.watch_dht(protocol)
    tracker = StateTracker(
        reactor, store, router, config.mirrored_registries, config.registry_filters
    )
    tracker.setServiceParent(node)
    metrics.watch_state(tracker)

    has_peers = bool(config.static_bootstrap_peers) or config.bootstrap_kind == "dns"
    client = peer_client(config, reactor)
    settings = mirror_settings(config)
    mirror = Mirror(reactor, router, client, settings, metrics=metrics) if has_peers else None
    if mirror is not None:
        metrics.watch_mirror(mirror)
    registry = Registry(
        reactor, store, config.mirrored_registries, config.registry_filters, mirror=mirror
    )
    TCPServer(
        config.registry_addr.port,
        RegistrySite(registry.resource(), metrics),
        interface=config.registry_addr.host,
        reactor=reactor,
    ).setServiceParent(node)
    web = None
    if config.debug_web_enabled:
        addresses = {
            "registry": str(config.registry_addr),
            "router": str(config.router_addr),
            "metrics": str(config.metrics_addr),
        }
        web = DebugWeb(
            reactor, router, router.protocol, tracker, metrics, client, settings, addresses
        ).resource()
    TCPServer(
        config.metrics_addr.port,
        Site(metrics_root(metrics, DebugPages(reactor, router, web))),
        interface=config.metrics_addr.host,
        reactor=reactor,
    ).setServiceParent(node)
    return node


def metrics_root(metrics: NodeMetrics, debug: DebugPages) -> Resource:
    """The metrics address: ``/metrics`` for Prometheus, ``/debug/...`` for people."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics.registry))
    root.putChild(b"debug", debug.resource())
    return root
