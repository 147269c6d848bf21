"""Wire the node's long-lived parts into one MultiService; nothing here runs on import."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TCPServer
from twisted.application.service import MultiService

from spegel_tx.config import Config
from spegel_tx.containerd.store import ContainerdStore
from spegel_tx.registry.access import RegistrySite
from spegel_tx.registry.app import Registry


def make_service(config: Config, reactor: Any) -> MultiService:
    node = MultiService()
    store = ContainerdStore(
        reactor,
        address=config.containerd_sock,
        namespace=config.containerd_namespace,
        content_path=config.containerd_content_path,
    )
    store.setServiceParent(node)
    registry = Registry(reactor, store, config.mirrored_registries, config.registry_filters)
    site = RegistrySite(registry.resource())
    registry_server = TCPServer(
        config.registry_addr.port, site, interface=config.registry_addr.host, reactor=reactor
    )
    registry_server.setServiceParent(node)
    return node
