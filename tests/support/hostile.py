"""A stranger on the DHT, controlled by the test: it forges ids, crowds a key, floods and
replays, on the in-memory network or over real loopback UDP.

``Stranger`` is what it says; ``StrangerProtocol`` puts it on a ``MemoryUDPNetwork``,
``UDPStranger`` on a real socket served by a thread.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from twisted.internet.protocol import DatagramProtocol

from spegel_tx.routing.kademlia.codec import DecodeError, decode, encode, fit_contacts
from spegel_tx.routing.kademlia.messages import (
    ID_LENGTH,
    RESPONSES,
    Ack,
    AddProvider,
    Body,
    Contact,
    FindNode,
    GetProviders,
    Header,
    Message,
    Nodes,
    Ping,
    Pong,
    Providers,
)


def ids_near(target: bytes, count: int, shared: int = 24) -> list[bytes]:
    """``count`` ids sharing their first ``shared`` bytes with ``target``: nearer to it than
    any real node of a cluster will be."""
    return [target[:shared] + os.urandom(ID_LENGTH - shared) for _ in range(count)]


def request(body: Body, sender_id: bytes, registry_port: int = 5000, txid: bytes = b"") -> bytes:
    """An unsigned request datagram, stamped now."""
    header = Header(txid or os.urandom(8), sender_id, registry_port, int(time.time() * 1000))
    return encode(Message(header, body))


class Stranger:
    """Answers every request under the next of ``ids`` (its pongs say they live at its
    own address) and names only those ids, at its own address or at ``named_hosts``,
    as the nodes nearest whatever is asked; it never names a provider."""

    def __init__(
        self,
        ids: Iterable[bytes],
        router_port: int = 0,
        named_hosts: Iterable[str] = (),
        registry_port: int = 5000,
    ) -> None:
        self.ids = list(ids)
        self._next = itertools.cycle(self.ids)
        self.router_port = router_port
        """Where it listens (UDPStranger sets it once bound)."""
        self._named_hosts = list(named_hosts)
        self._registry_port = registry_port
        self.received: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.keys_offered: set[bytes] = set()
        """Keys nodes placed on the stranger with AddProvider."""

    def answer(self, datagram: bytes, own_host: str) -> bytes | None:
        self.bytes_in += len(datagram)
        try:
            message = decode(datagram)
        except DecodeError:
            self.received["undecodable"] += 1
            return None
        self.received[type(message.body).__name__] += 1
        if message.type in RESPONSES:
            return None
        body = message.body
        reply: Body = Ack()
        if isinstance(body, Ping):
            reply = Pong()
        elif isinstance(body, FindNode):
            reply = Nodes(self._forged(own_host))
        elif isinstance(body, GetProviders):
            reply = Providers((), self._forged(own_host))
        elif isinstance(body, AddProvider):
            self.keys_offered.update(body.keys)
        header = Header(message.header.txid, next(self._next), self._registry_port, 0)
        data = encode(Message(header, reply))
        self.bytes_out += len(data)
        return data

    def _forged(self, own_host: str) -> tuple[Contact, ...]:
        hosts = self._named_hosts or [own_host]
        named = [
            Contact(node_id, hosts[index % len(hosts)], self.router_port)
            for index, node_id in enumerate(self.ids[:20])
        ]
        return fit_contacts(named)

    def claims(self, body: Body) -> Iterator[bytes]:
        """A request under each of its ids."""
        for node_id in self.ids:
            yield request(body, node_id, self._registry_port)


class StrangerProtocol(DatagramProtocol):
    """A Stranger on the in-memory network."""

    def __init__(self, stranger: Stranger, host: str) -> None:
        self.stranger = stranger
        self.host = host

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        reply = self.stranger.answer(datagram, self.host)
        if reply is not None and self.transport is not None:
            self.transport.write(reply, addr)

    def send(self, datagram: bytes, address: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.write(datagram, address)


class UDPStranger:
    """A Stranger on a real UDP socket at ``host``, answering from a thread until closed."""

    def __init__(self, stranger: Stranger, host: str) -> None:
        self.stranger = stranger
        self.host = host
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.socket.bind((host, 0))
        self.socket.settimeout(0.1)
        self.address = (host, int(self.socket.getsockname()[1]))
        stranger.router_port = self.address[1]
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                datagram, addr = self.socket.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                reply = self.stranger.answer(datagram, self.host)
            if reply is not None:
                self.socket.sendto(reply, addr)

    def send(self, datagram: bytes, address: tuple[str, int]) -> None:
        self.socket.sendto(datagram, address)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self.socket.close()

    def __enter__(self) -> UDPStranger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Captured = tuple[tuple[str, int], tuple[str, int], bytes]
"""A UDP datagram seen on the wire: source, destination, payload."""


class LoopbackCapture:
    """Every UDP datagram between ``hosts`` on the loopback interface, as a stranger on
    the path (a shared network segment) sees it. Needs CAP_NET_RAW (PermissionError
    without it)."""

    _ETH_P_ALL = 0x0003
    _ETHERNET = 14

    def __init__(self, hosts: Iterable[str]) -> None:
        self._hosts = {socket.inet_aton(host) for host in hosts}
        self.socket = socket.socket(
            socket.AF_PACKET, socket.SOCK_RAW, socket.htons(self._ETH_P_ALL)
        )
        self.socket.bind(("lo", 0))
        self.socket.settimeout(0.1)
        self.datagrams: list[Captured] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._capture, daemon=True)
        self._thread.start()

    def _capture(self) -> None:
        while not self._stopping.is_set():
            try:
                frame, (_, _, kind, *_) = self.socket.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if kind == socket.PACKET_OUTGOING:
                continue  # loopback shows each frame twice: sent, then received
            datagram = self._udp(frame[self._ETHERNET :])
            if datagram is not None:
                self.datagrams.append(datagram)

    def _udp(self, packet: bytes) -> Captured | None:
        if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != socket.IPPROTO_UDP:
            return None
        source, destination = packet[12:16], packet[16:20]
        if source not in self._hosts or destination not in self._hosts:
            return None
        udp = packet[(packet[0] & 0x0F) * 4 :]
        return (
            (socket.inet_ntoa(source), int.from_bytes(udp[0:2], "big")),
            (socket.inet_ntoa(destination), int.from_bytes(udp[2:4], "big")),
            udp[8 : int.from_bytes(udp[4:6], "big")],
        )

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self.socket.close()

    def __enter__(self) -> LoopbackCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
