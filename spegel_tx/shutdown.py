"""Leave the cluster the way a rolling update needs it left.

Kubernetes and systemd stop a node with SIGTERM, then SIGKILL once their grace
period is over. Until then the node answers what it already started: it
withdraws its records (peers stop sending it requests), turns ``/readyz`` to
503, stops accepting connections (containerd moves on to its next mirror
target at once), closes idle kept-alive connections, and lets responses in
flight finish for ``shutdown-grace-period``. A second SIGTERM, or the end of
the grace period, cuts what is left. A node stopped this way exits 0.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from spegel_tx.registry.access import RegistrySite

_log = Logger()


class GracefulNode(MultiService):
    """Services that, on stop, drain the registry before the rest stops."""

    def __init__(self, clock: Any, grace_period: float) -> None:
        super().__init__()
        self._clock = clock
        self.grace_period = grace_period
        self._site: RegistrySite | None = None
        self._first: tuple[IService, ...] = ()
        self._listener: IService | None = None
        self._cut_short: Deferred[None] | None = None
        self.stopping = False

    def drains(self, site: RegistrySite, listener: IService, *first: IService) -> None:
        """On stop: ``first`` stop (the tracker and the router, which withdraws),
        ``listener`` stops accepting, and ``site``'s connections are waited for."""
        self._site = site
        self._listener = listener
        self._first = first

    def terminate(self) -> None:
        """SIGTERM: the first begins the stop, the next one cuts the drain short."""
        if self._cut_short is not None:
            if not self._cut_short.called:
                _log.info("second SIGTERM: closing the connections still open")
                self._cut_short.callback(None)
        elif not self.stopping:
            self._clock.stop()

    def stopService(self) -> Deferred[None]:
        self.stopping = True
        Service.stopService(self)
        d = Deferred.fromCoroutine(self._drain())
        d.addErrback(lambda f: _log.failure("draining the registry failed", f))
        return d.addCallback(lambda _: self._stop_the_rest())

    async def _drain(self) -> None:
        if self._site is None or self._listener is None:
            return
        for service in self._first:
            maybeDeferred(service.stopService).addErrback(_stop_failed, type(service).__name__)
        await maybeDeferred(self._listener.stopService)
        _log.info(
            "stopping: records withdrawn, not accepting connections; waiting up to "
            "{grace_period} s for {open} open connections",
            grace_period=self.grace_period,
            open=len(self._site.channels),
        )
        cut_short = self._cut_short = Deferred()
        timer = self._clock.callLater(self.grace_period, cut_short.callback, None)
        drained = self._site.drain()
        drained.addCallback(lambda _: cut_short.callback(None) if not cut_short.called else None)
        await cut_short
        if timer.active():
            timer.cancel()
        if self._site.channels:
            _log.info("cutting {open} connections still open", open=len(self._site.channels))
            self._site.abort()

    def _stop_the_rest(self) -> Deferred[None]:
        stops = [maybeDeferred(s.stopService) for s in reversed(list(self)) if s.running]
        return DeferredList(stops).addCallback(lambda _: None)


def _stop_failed(failure: Failure, service: str) -> None:
    _log.failure("stopping {service} failed", failure, service=service)


def handle_sigterm(reactor: Any, node: GracefulNode) -> None:
    """Take SIGTERM from Twisted once the reactor runs: Twisted's own handler would
    stop the reactor too, but exit by the signal and ignore a second one."""

    def received(number: int, frame: FrameType | None) -> None:
        reactor.callFromThread(node.terminate)

    reactor.callWhenRunning(signal.signal, signal.SIGTERM, received)
