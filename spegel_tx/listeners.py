"""The node's listening sockets; an empty host means every address of both IP stacks.

Twisted listens on IPv4 alone for an empty interface, and on ``::`` leaves the
IPv4 half to the ``net.ipv6.bindv6only`` sysctl. Go's ``net.Listen(":5000")``,
whose address forms ours follow, takes both stacks, and a pod of a dual-stack or
IPv6-only cluster needs them: so for an empty host the socket is made here, IPv6
with ``IPV6_V6ONLY`` off, and handed to the reactor. IPv4 peers then show up as
``::ffff:a.b.c.d`` (``unmapped`` gives their IPv4 text back). A machine without
IPv6 gets an IPv4 socket, as before.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.protocol import DatagramProtocol

from spegel_tx.config import Address

BACKLOG = 50
"""Twisted's own default for listenTCP."""

MAX_DATAGRAM_READ = 8192
"""Twisted's own default for listenUDP: more than any DHT datagram."""

_V4_MAPPED = "::ffff:"


def unmapped(host: str) -> str:
    """``::ffff:10.0.0.2`` → ``10.0.0.2``: an IPv4 peer of a dual-stack socket, as IPv4."""
    if host.startswith(_V4_MAPPED) and "." in host:
        return host[len(_V4_MAPPED) :]
    return host


def _dual_stack_socket(kind: int, port: int) -> socket.socket | None:
    """A bound socket on ``port`` of every address, IPv6 and IPv4; None without IPv6."""
    try:
        sock = socket.socket(socket.AF_INET6, kind)
    except OSError as e:
        if e.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            return None
        raise CannotListenError("", port, e) from None
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if kind == socket.SOCK_STREAM:
            # As Twisted's own TCP ports: a restarted node binds while old connections linger.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
        if kind == socket.SOCK_STREAM:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise CannotListenError("", port, e) from None
    return sock


def listen_tcp(reactor: Any, address: Address, factory: IProtocolFactory) -> IListeningPort:
    if address.host == "":
        sock = _dual_stack_socket(socket.SOCK_STREAM, address.port)
        if sock is not None:
            with sock:  # the reactor keeps its own duplicate of the descriptor
                port: IListeningPort = reactor.adoptStreamPort(
                    sock.fileno(), socket.AF_INET6, factory
                )
                return port
    port = reactor.listenTCP(address.port, factory, BACKLOG, address.host)
    return port


def listen_udp(reactor: Any, address: Address, protocol: DatagramProtocol) -> IListeningPort:
    if address.host == "":
        sock = _dual_stack_socket(socket.SOCK_DGRAM, address.port)
        if sock is not None:
            with sock:
                port: IListeningPort = reactor.adoptDatagramPort(
                    sock.fileno(), socket.AF_INET6, protocol, MAX_DATAGRAM_READ
                )
                return port
    port = reactor.listenUDP(address.port, protocol, address.host, MAX_DATAGRAM_READ)
    return port


class _Listener(Service):
    """Listens while running; like ``TCPServer``, it binds in ``privilegedStartService``."""

    def __init__(self, reactor: Any, address: Address) -> None:
        self._reactor = reactor
        self.address = address
        self.port: IListeningPort | None = None

    def _listen(self) -> IListeningPort:
        raise NotImplementedError

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self.port = self._listen()

    def startService(self) -> None:
        Service.startService(self)
        if self.port is None:
            self.port = self._listen()

    def stopService(self) -> Deferred[object] | None:
        Service.stopService(self)
        port, self.port = self.port, None
        if port is None:
            return None
        stopped: Deferred[object] = maybeDeferred(port.stopListening)
        return stopped


class TCPListener(_Listener):
    def __init__(self, reactor: Any, address: Address, factory: IProtocolFactory) -> None:
        super().__init__(reactor, address)
        self.factory = factory

    def _listen(self) -> IListeningPort:
        return listen_tcp(self._reactor, self.address, self.factory)


class UDPListener(_Listener):
    def __init__(self, reactor: Any, address: Address, protocol: DatagramProtocol) -> None:
        super().__init__(reactor, address)
        self._protocol = protocol

    def _listen(self) -> IListeningPort:
        return listen_udp(self._reactor, self.address, self._protocol)
