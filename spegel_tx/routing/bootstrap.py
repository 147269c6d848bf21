"""Where a node finds its first DHT peers.

Addresses come back as IP literals: the DHT matches answers by their source
address, which is always an IP.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IAddress, IHostResolution, IResolutionReceiver
from twisted.logger import Logger, LogLevel
from twisted.names import dns
from zope.interface import implementer

from spegel_tx.config import Address
from spegel_tx.interfaces import IBootstrapper

_log = Logger()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IResolutionReceiver)
class _Addresses:
    """Collects what the reactor's name resolver finds for one name."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str) and host not in self.hosts:
            self.hosts.append(host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.hosts)


def resolve_all(reactor: Any, host: str) -> Deferred[list[str]]:
    """Every IPv4 and IPv6 address of ``host`` (getaddrinfo's A and AAAA answers and
    /etc/hosts), in the resolver's order; an empty list if it has none."""
    receiver = _Addresses()
    reactor.nameResolver.resolveHostName(receiver, host, 0, (IPv4Address, IPv6Address), "UDP")
    return receiver.done


@implementer(IBootstrapper)
class StaticBootstrapper:
    """A fixed list of ``host:port`` router addresses; host names are resolved each time,
    to all their addresses: a dual-stack peer is asked on both."""

    def __init__(self, reactor: Any, peers: tuple[Address, ...]) -> None:
        self._reactor = reactor
        self._peers = peers

    async def _resolve(self) -> list[tuple[str, int]]:
        found = []
        for peer in self._peers:
            if _is_ip(peer.host):
                found.append((peer.host, peer.port))
                continue
            hosts = await resolve_all(self._reactor, peer.host)
            if not hosts:
                _log.warn("cannot resolve bootstrap peer {host}", host=peer.host)
            found.extend((host, peer.port) for host in hosts)
        return found

    def peers(self) -> Deferred[list[tuple[str, int]]]:
        return Deferred.fromCoroutine(self._resolve())


@implementer(IBootstrapper)
class DNSBootstrapper:
    """Every A and AAAA record of a name (a Kubernetes headless Service), at our router port."""

    def __init__(self, resolver: Any, domain: str, port: int) -> None:
        self._resolver = resolver
        self._domain = domain
        self._port = port
        self._empty_told = False

    async def _lookup(self) -> list[tuple[str, int]]:
        results = await DeferredList(
            [
                self._resolver.lookupAddress(self._domain),
                self._resolver.lookupIPV6Address(self._domain),
            ],
            consumeErrors=True,
        )
        hosts = []
        for succeeded, result in results:
            if not succeeded:
                continue
            answers, _, _ = result
            for record in answers:
                if record.type in (dns.A, dns.AAAA):
                    hosts.append(
                        record.payload.dottedQuad() if record.type == dns.A else _aaaa(record)
                    )
        # Said once until the name has addresses again: bootstrap retries it every few seconds.
        level = LogLevel.debug if self._empty_told else LogLevel.warn
        if not hosts:
            _log.emit(level, "no A or AAAA records for {domain}", domain=self._domain)
        self._empty_told = not hosts
        return [(host, self._port) for host in sorted(set(hosts))]

    def peers(self) -> Deferred[list[tuple[str, int]]]:
        return Deferred.fromCoroutine(self._lookup())


def _aaaa(record: Any) -> str:
    return str(ipaddress.IPv6Address(record.payload.address))
