"""What this node has learned of its peers' registries: how fast they answer, and
which to leave alone for a while.

A DHT record outlives the node that published it by up to its TTL (19 minutes),
so a crashed node keeps being named as a provider. Remembering that it refused
or timed out spares every later request the same wait.
"""

from __future__ import annotations

from collections import deque
from typing import Any

Peer = tuple[str, int]
"""A peer's registry: ``(host, port)``."""

LATENCY_SAMPLES = 64
"""Recent time-to-headers samples the hedge delay is learned from."""

DEFAULT_HEDGE_DELAY = 0.1
"""Seconds before a second provider is tried, until enough samples are in."""

MIN_HEDGE_DELAY = 0.01
MAX_HEDGE_DELAY = 1.0


class PeerHealth:
    def __init__(self, clock: Any, quarantine: float = 30.0) -> None:
        self._clock = clock
        self.quarantine_seconds = quarantine
        self._until: dict[Peer, float] = {}
        self._latencies: deque[float] = deque(maxlen=LATENCY_SAMPLES)

    def quarantined(self, peer: Peer) -> bool:
        until = self._until.get(peer)
        if until is None:
            return False
        if until <= self._clock.seconds():
            del self._until[peer]
            return False
        return True

    def quarantine(self, peer: Peer, seconds: float | None = None) -> None:
        """Skip ``peer`` for ``seconds`` (the configured quarantine by default)."""
        duration = self.quarantine_seconds if seconds is None else seconds
        until = self._clock.seconds() + duration
        self._until[peer] = max(until, self._until.get(peer, 0.0))

    def quarantined_peers(self) -> list[Peer]:
        return [peer for peer in list(self._until) if self.quarantined(peer)]

    def answered(self, seconds: float) -> None:
        """A peer sent response headers ``seconds`` after the request left."""
        self._latencies.append(seconds)

    def hedge_delay(self) -> float:
        """Twice the 90th percentile of recent times to headers: a provider slower than
        that is likely stuck, and a second one is started beside it."""
        if len(self._latencies) < 8:
            return DEFAULT_HEDGE_DELAY
        ordered = sorted(self._latencies)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        return min(MAX_HEDGE_DELAY, max(MIN_HEDGE_DELAY, 2 * p90))
