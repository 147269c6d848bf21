"""Whether the node should be sent pulls: the one answer ``/readyz``, ``/debug/peers``
and the debug page all give.

A node is ready when containerd answers and, if it forwards what it lacks to peers,
its DHT knows at least one peer. A node with nowhere to find peers (``static`` with no
``static-bootstrap-peers``) never forwards, so containerd alone decides. A node that
got SIGTERM is not ready while it drains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from spegel_tx.interfaces import IContentStore

CONTAINERD_DOWN = "containerd is not reachable"
NO_PEER = "no DHT peer found yet"
STOPPING = "shutting down"


class _Peers(Protocol):
    def ready(self) -> bool:
        """True once at least one peer is known."""


class Readiness:
    def __init__(
        self,
        store: IContentStore,
        peers: _Peers | None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        """``peers`` is the router (or the mirror that uses it) when the node forwards,
        None when it never does; ``stopping`` is true once SIGTERM came."""
        self._store = store
        self._peers = peers
        self._stopping = stopping

    def reasons(self) -> list[str]:
        """Why the node is not ready, one short sentence each; empty when it is."""
        reasons = [STOPPING] if self._stopping() else []
        if not self._store.ready():
            reasons.append(CONTAINERD_DOWN)
        if self._peers is not None and not self._peers.ready():
            reasons.append(NO_PEER)
        return reasons

    def ready(self) -> bool:
        return not self.reasons()
