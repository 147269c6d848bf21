"""The DHT's RPC layer: one UDP socket, requests with clock timeouts, and the provider records
this node stores for others.

Modelled on twisted.names' DNSMixin: a map of pending transaction ids, each
with a Deferred and a timeout on the injected clock. Nothing that arrives can
raise out of ``datagramReceived``: bad datagrams are dropped and counted.
"""

from __future__ import annotations

import os
import socket
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from spegel_tx.routing.kademlia.codec import (
    DecodeError,
    decode,
    encode,
    fit_contacts,
    fit_providers,
)
from spegel_tx.routing.kademlia.messages import (
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
    Provider,
    Providers,
    RemoveProvider,
)
from spegel_tx.routing.kademlia.table import RoutingTable

_log = Logger()

RECEIVE_BUFFER = 4 * 1024 * 1024
"""Bytes the kernel may queue for the DHT socket (capped by net.core.rmem_max)."""

REPLAY_WINDOW = 60.0
"""Authenticated datagrams older or newer than this many seconds are replays or forgeries."""

SEEN_TXIDS = 4096
"""Recent authenticated request ids remembered to drop exact replays."""


@dataclass
class ProviderRecord:
    provider: Provider
    expires: float


class RequestTimeout(TimeoutError):
    """A peer did not answer in time."""


class RequestUnsendable(Exception):
    """The datagram could not leave this node for that address."""


class KademliaProtocol(DatagramProtocol):
    """Sends and answers DHT RPCs; knows nothing of lookups (see ``lookup.py``)."""

    def __init__(
        self,
        clock: IReactorTime,
        node_id: bytes,
        registry_port: int,
        secret: bytes | None = None,
        k: int = 20,
        request_timeout: float = 0.5,
        record_ttl: float = 19 * 60.0,
        max_keys_stored: int = 1_000_000,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """``randbytes`` draws transaction ids and refresh targets: a simulation passes a
        seeded one to be repeatable; a real node keeps ``os.urandom``, so that an off-path
        sender cannot guess a pending transaction id."""
        self.clock = clock
        self.node_id = node_id
        self.registry_port = registry_port
        self.secret = secret
        self.k = k
        self.request_timeout = request_timeout
        self.record_ttl = record_ttl
        self.max_keys_stored = max_keys_stored
        self.table = RoutingTable(node_id, k, randbytes)
        self._randbytes = randbytes
        self.records: dict[bytes, dict[bytes, ProviderRecord]] = {}
        self.counters: Counter[str] = Counter()
        self._pending: dict[bytes, tuple[Deferred[Message], IDelayedCall, tuple[str, int]]] = {}
        self._seen_txids: OrderedDict[bytes, None] = OrderedDict()
        self._pinging: set[bytes] = set()
        self.own_addresses: set[tuple[str, int]] = set()
        self.on_peer_seen: Callable[[tuple[str, int]], None] | None = None
        """Told ``(host, registry port)`` of every node a datagram comes from: it is alive."""

    # Sending

    def _header(self, txid: bytes) -> Header:
        return Header(txid, self.node_id, self.registry_port, int(self.clock.seconds() * 1000))

    def _send(self, message: Message, address: tuple[str, int]) -> None:
        if self.transport is None:
            return
        data = encode(message, self.secret)
        self.counters["datagrams_out"] += 1
        self.counters["bytes_out"] += len(data)
        self.transport.write(data, address)

    def request(self, contact: Contact, body: Body, evicts: bool = True) -> Deferred[Message]:
        """Send ``body`` to ``contact``; the Deferred fires with the response message or
        fails with RequestTimeout, after which the contact counts as failed unless
        ``evicts`` is false (a store sent in a burst may time out in a full socket
        buffer without its node being gone)."""
        txid = self._randbytes(8)
        address = (contact.host, contact.port)
        try:
            self._send(Message(self._header(txid), body), address)
        except (OSError, ValueError) as e:
            # An address of the other family (a dual-stack headless Service), or a
            # network the kernel cannot reach: that peer fails, the caller goes on.
            self.counters["send_errors"] += 1
            return fail(RequestUnsendable(f"{contact.host}:{contact.port}: {e}"))
        result: Deferred[Message] = Deferred(lambda _: self._forget(txid))
        timeout = self.clock.callLater(self.request_timeout, self._timed_out, txid, contact, evicts)
        self._pending[txid] = (result, timeout, address)
        return result

    def _forget(self, txid: bytes) -> None:
        pending = self._pending.pop(txid, None)
        if pending is not None and pending[1].active():
            pending[1].cancel()

    def _timed_out(self, txid: bytes, contact: Contact, evicts: bool) -> None:
        pending = self._pending.pop(txid, None)
        if pending is None:
            return
        self.counters["timeouts"] += 1
        if evicts:
            self.table.failed(contact.node_id)
        pending[0].errback(RequestTimeout(f"{contact.host}:{contact.port} did not answer"))

    def startProtocol(self) -> None:
        """A burst of answers (a peer advertising thousands of keys, or many peers
        looking up at once) must not overflow the kernel's default 208 KiB buffer."""
        handle = getattr(self.transport, "getHandle", lambda: None)()
        if handle is not None:
            try:
                handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            except OSError as e:
                _log.warn("could not enlarge the DHT receive buffer: {error}", error=str(e))

    def ping(self, contact: Contact) -> Deferred[Message]:
        return self.request(contact, Ping())

    # Receiving

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.counters["datagrams_in"] += 1
        self.counters["bytes_in"] += len(datagram)
        try:
            message = decode(datagram, self.secret)
        except DecodeError as e:
            self._drop(e.reason)
            return
        try:
            self._received(message, (addr[0], addr[1]))
        except Exception:
            self._drop("error")
            _log.failure("handling a datagram from {host}:{port}", host=addr[0], port=addr[1])

    def _drop(self, reason: str) -> None:
        self.counters[f"dropped_{reason}"] += 1

    def _received(self, message: Message, address: tuple[str, int]) -> None:
        header = message.header
        if header.sender_id == self.node_id:
            # Our own datagram came back: the address is ours (a bootstrap list or a
            # headless Service usually names this node too).
            self.own_addresses.add(address)
            self._drop("self")
            return
        if self.secret is not None and not self._fresh(header):
            return
        if message.type in RESPONSES:
            pending = self._pending.get(header.txid)
            if pending is None or pending[2] != address:
                self._drop("unexpected")
                return
            self._forget(header.txid)
            self._contact_seen(Contact(header.sender_id, address[0], address[1]))
            self._peer_seen(address[0], header.registry_port)
            pending[0].callback(message)
            return
        self._contact_seen(Contact(header.sender_id, address[0], address[1]))
        self._peer_seen(address[0], header.registry_port)
        response = self._answer(message, address)
        self._send(Message(self._header(header.txid), response), address)

    def _fresh(self, header: Header) -> bool:
        """With a secret, a datagram is authentic; refuse it if old or already seen."""
        age = abs(self.clock.seconds() - header.timestamp_ms / 1000)
        if age > REPLAY_WINDOW:
            self._drop("stale")
            return False
        if header.txid in self._seen_txids:
            self._drop("replay")
            return False
        self._seen_txids[header.txid] = None
        if len(self._seen_txids) > SEEN_TXIDS:
            self._seen_txids.popitem(last=False)
        return True

    def heard_of(self, contact: Contact) -> None:
        """A contact named in another node's answer: pinged if its bucket is empty.

        Only nodes that talk to us enter the table, as Kademlia requires. But when
        many nodes join at once, each one's searches reach only nodes as near as
        itself, and a whole half of the id space can end up knowing nobody in the
        other half of its side: searches there then stop short, at the wrong nodes.
        A node named by someone else is the only way across; a ping lets it in.
        """
        if contact.node_id != self.node_id and self.table.bucket_size(contact.node_id) == 0:
            self._ping_once(contact, lambda: None)

    def _ping_once(self, contact: Contact, answered: Callable[[], object]) -> None:
        """Ping ``contact`` and call ``answered`` if it does, unless a ping to it is
        already out: however many newcomers knock, or answers name it, one at a time."""
        if contact.node_id in self._pinging:
            return
        self._pinging.add(contact.node_id)
        self.ping(contact).addCallbacks(lambda _: answered(), lambda _: None).addBoth(
            lambda _: self._pinging.discard(contact.node_id)
        )

    def _contact_seen(self, contact: Contact) -> None:
        oldest = self.table.seen(contact, self.clock.seconds())
        if oldest is not None:
            # Ping before evicting: a live old contact keeps its place.
            self._ping_once(oldest, lambda: self.table.seen(oldest, self.clock.seconds()))

    def _peer_seen(self, host: str, registry_port: int) -> None:
        if self.on_peer_seen is not None:
            self.on_peer_seen((host, registry_port))

    def _answer(self, message: Message, address: tuple[str, int]) -> Body:
        body = message.body
        if isinstance(body, Ping):
            return Pong()
        if isinstance(body, FindNode):
            return Nodes(fit_contacts(tuple(self.table.closest(body.target, self.k))))
        if isinstance(body, GetProviders):
            providers = tuple(self.providers_of(body.key))
            closer = tuple(self.table.closest(body.key, self.k))
            fitted_providers, fitted_closer = fit_providers(providers, closer)
            return Providers(fitted_providers, fitted_closer)
        provider = Provider(message.header.sender_id, address[0], message.header.registry_port)
        if isinstance(body, AddProvider):
            for key in body.keys:
                self.store(key, provider)
        elif isinstance(body, RemoveProvider):
            for key in body.keys:
                self.unstore(key, provider.node_id)
        return Ack()

    # The records this node keeps for others

    def store(self, key: bytes, provider: Provider) -> None:
        holders = self.records.get(key)
        if holders is None:
            if len(self.records) >= self.max_keys_stored:
                self._drop("store_full")
                return
            holders = self.records[key] = {}
        holders[provider.node_id] = ProviderRecord(provider, self.clock.seconds() + self.record_ttl)

    def unstore(self, key: bytes, node_id: bytes) -> None:
        holders = self.records.get(key)
        if holders is not None:
            holders.pop(node_id, None)
            if not holders:
                del self.records[key]

    def providers_of(self, key: bytes) -> list[Provider]:
        now = self.clock.seconds()
        holders = self.records.get(key, {})
        return [record.provider for record in holders.values() if record.expires > now]

    def expire_records(self) -> int:
        """Drop expired records; returns how many went."""
        now = self.clock.seconds()
        removed = 0
        for key in list(self.records):
            holders = self.records[key]
            for node_id in [n for n, r in holders.items() if r.expires <= now]:
                del holders[node_id]
                removed += 1
            if not holders:
                del self.records[key]
        return removed

    def stopProtocol(self) -> None:
        for txid in list(self._pending):
            deferred, timeout, _ = self._pending.pop(txid)
            if timeout.active():
                timeout.cancel()
            deferred.errback(RequestTimeout("the DHT stopped"))
