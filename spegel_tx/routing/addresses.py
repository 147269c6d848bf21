"""Every address each DHT node has answered from, so that a peer named at one address
can be reached at another.

A pod of a dual-stack cluster has an IPv4 and an IPv6 address, and the headless
Service names both: bootstrap pings each, and the node answers on each under one
id. A provider record holds one of them, the one its datagram came from, which
need not be the one this node can reach (a single-stack node, a network policy
that lets one family through). Only answers to this node's own requests are
learned (an address that answered our transaction id under that node id), never
an address a datagram merely claims.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_NODES = 4096
"""Nodes remembered, the least recently seen forgotten first."""

MAX_HOSTS_PER_NODE = 4
"""Addresses kept per node, the most recent: a pod has one per IP family."""


class NodeAddresses:
    def __init__(self, max_nodes: int = MAX_NODES) -> None:
        self._max_nodes = max_nodes
        self._hosts: OrderedDict[bytes, list[str]] = OrderedDict()
        self._node_of: dict[str, bytes] = {}

    def learn(self, node_id: bytes, host: str) -> None:
        """``node_id`` answered from ``host``."""
        previous = self._node_of.get(host)
        if previous is not None and previous != node_id:
            # A new node at an old address (a pod's IP given to another pod).
            self._drop_host(previous, host)
        hosts = self._hosts.setdefault(node_id, [])
        self._hosts.move_to_end(node_id)
        if host in hosts:
            hosts.remove(host)
        hosts.append(host)
        self._node_of[host] = node_id
        if len(hosts) > MAX_HOSTS_PER_NODE:
            self._node_of.pop(hosts.pop(0), None)
        while len(self._hosts) > self._max_nodes:
            _, forgotten = self._hosts.popitem(last=False)
            for old in forgotten:
                self._node_of.pop(old, None)

    def _drop_host(self, node_id: bytes, host: str) -> None:
        hosts = self._hosts.get(node_id, [])
        if host in hosts:
            hosts.remove(host)
        if not hosts:
            self._hosts.pop(node_id, None)

    def hosts_of(self, host: str) -> list[str]:
        """Every known address of the node at ``host``, IPv6 first (as RFC 8305 and
        Spegel order them), ``host`` alone when the node is not known."""
        node_id = self._node_of.get(host)
        hosts = self._hosts.get(node_id, []) if node_id is not None else []
        if host not in hosts:
            return [host]
        return sorted(hosts, key=lambda h: ":" not in h)
