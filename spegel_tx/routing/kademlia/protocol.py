"""The DHT's RPC layer: one UDP socket, requests with clock timeouts, and the answers
this node gives, from its routing table and the provider records it keeps for others.

Modelled on twisted.names' DNSMixin: a map of pending transaction ids, each
with a Deferred and a timeout on the injected clock. Nothing that arrives can
raise out of ``datagramReceived``: bad datagrams are dropped and counted.

Nothing a datagram claims is taken on its word. A sender enters the routing
table only by answering a ping from the address it claims; a signed datagram
must be for this node and come from the address it was signed for; what any
one address may cost this node is bounded (``limits.py``).
"""

from __future__ import annotations

import functools
import os
import socket
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from spegel_tx.listeners import unmapped
from spegel_tx.routing.addresses import NodeAddresses
from spegel_tx.routing.kademlia.codec import (
    DecodeError,
    body_room,
    canonical_host,
    decode,
    encode,
    fit_contacts,
    fit_providers,
)
from spegel_tx.routing.kademlia.limits import DEFAULT_LIMITS, ByteBudget, Limits
from spegel_tx.routing.kademlia.messages import (
    ID_LENGTH,
    NO_RECEIVER,
    RESPONSES,
    Ack,
    AddProvider,
    Binding,
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
from spegel_tx.routing.kademlia.records import ProviderRecords
from spegel_tx.routing.kademlia.table import RoutingTable

_log = Logger()

RECEIVE_BUFFER = 4 * 1024 * 1024
"""Bytes the kernel may queue for the DHT socket (capped by net.core.rmem_max)."""

REPLAY_WINDOW = 60.0
"""Authenticated datagrams older or newer than this many seconds are replays or forgeries."""

SEEN_TXIDS = 4096
"""Recent authenticated request ids remembered to drop exact replays."""

_WILDCARDS = frozenset(("", "0.0.0.0", "::"))


class RequestTimeout(TimeoutError):
    """A peer did not answer in time."""


class RequestUnsendable(Exception):
    """The datagram could not leave this node for that address."""


class AnsweredByAnother(Exception):
    """Another node answers at the address asked: the one asked is no longer there."""


@dataclass
class _Pending:
    result: Deferred[Message]
    timeout: IDelayedCall
    contact: Contact
    evicts: bool


@functools.lru_cache(maxsize=1024)
def _route_source(host: str) -> str:
    """The local address the kernel sends from towards ``host``, which is the address
    ``host`` sees. Connecting a UDP socket sends nothing; it only picks the route."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return canonical_host(str(probe.getsockname()[0]))


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
        limits: Limits = DEFAULT_LIMITS,
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
        self.limits = limits
        self.table = RoutingTable(node_id, k, randbytes, limits.contacts_per_host)
        self.records = ProviderRecords(clock, record_ttl, limits.records, limits.records_per_host)
        self._randbytes = randbytes
        self.counters: Counter[str] = Counter()
        self._pending: dict[bytes, _Pending] = {}
        self._seen_txids: OrderedDict[bytes, None] = OrderedDict()
        self._checking: set[tuple[str, int]] = set()
        self._answer_budget = ByteBudget(clock, limits.answer_rate, limits.answer_burst)
        self._total_budget = ByteBudget(clock, limits.answer_rate_total, limits.answer_burst_total)
        self._awaiting_peer: list[Deferred[None]] = []
        self.own_addresses: set[tuple[str, int]] = set()
        self.addresses = NodeAddresses()
        """Every address each node answered from: a dual-stack peer has two."""
        self.on_peer_seen: Callable[[tuple[str, int]], None] | None = None
        """Told ``(host, registry port)`` of every node a datagram comes from: it is alive."""

    # Sending

    def _header(self, txid: bytes) -> Header:
        return Header(txid, self.node_id, self.registry_port, int(self.clock.seconds() * 1000))

    def _datagram(self, txid: bytes, body: Body, to: tuple[str, int], receiver_id: bytes) -> bytes:
        """The datagram for ``body``; with a secret, bound to the receiver and to the
        address it leaves from."""
        binding = None
        if self.secret is not None:
            if len(receiver_id) != ID_LENGTH:
                receiver_id = NO_RECEIVER
            binding = Binding(receiver_id, *self._source_towards(to[0]))
        return encode(Message(self._header(txid), body, binding), self.secret)

    def _source_towards(self, host: str) -> tuple[str, int]:
        """This node's address as ``host`` will see it."""
        if self.transport is None:
            raise RequestUnsendable("the DHT is not listening")
        bound = self.transport.getHost()
        if bound.host in _WILDCARDS:
            return _route_source(host), bound.port
        return canonical_host(bound.host), bound.port

    def _write(self, data: bytes, address: tuple[str, int]) -> None:
        if self.transport is None:
            raise RequestUnsendable("the DHT is not listening")
        self.counters["datagrams_out"] += 1
        self.counters["bytes_out"] += len(data)
        host, port = address
        if getattr(self.transport, "addressFamily", None) == socket.AF_INET6 and ":" not in host:
            # A dual-stack socket (listeners.py) reaches IPv4 peers at their mapped address.
            host = f"::ffff:{host}"
        self.transport.write(data, (host, port))

    def request(self, contact: Contact, body: Body, evicts: bool = True) -> Deferred[Message]:
        """Send ``body`` to ``contact``; the Deferred fires with the response message or
        fails with RequestTimeout, after which the contact counts as failed unless
        ``evicts`` is false (a store sent in a burst may time out in a full socket
        buffer without its node being gone). A contact with an id must answer under
        that id (else AnsweredByAnother); one without (a bootstrap address) under any."""
        txid = self._randbytes(8)
        address = (contact.host, contact.port)
        try:
            self._write(self._datagram(txid, body, address, contact.node_id), address)
        except RequestUnsendable as e:
            return fail(e)
        except (OSError, ValueError) as e:
            # An address of the other family (a dual-stack headless Service), or a
            # network the kernel cannot reach: that peer fails, the caller goes on.
            self.counters["send_errors"] += 1
            return fail(RequestUnsendable(f"{contact.host}:{contact.port}: {e}"))
        result: Deferred[Message] = Deferred(lambda _: self._forget(txid))
        timeout = self.clock.callLater(self.request_timeout, self._timed_out, txid)
        self._pending[txid] = _Pending(result, timeout, contact, evicts)
        return result

    def _forget(self, txid: bytes) -> None:
        pending = self._pending.pop(txid, None)
        if pending is not None and pending.timeout.active():
            pending.timeout.cancel()

    def _timed_out(self, txid: bytes) -> None:
        pending = self._pending.pop(txid, None)
        if pending is None:
            return
        self.counters["timeouts"] += 1
        contact = pending.contact
        if pending.evicts:
            self.table.failed(contact)
        pending.result.errback(RequestTimeout(f"{contact.host}:{contact.port} did not answer"))

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

    def peer_known(self) -> Deferred[None]:
        """Fires once the routing table holds a contact (at once if it does already)."""
        if len(self.table):
            return succeed(None)
        waiting: Deferred[None] = Deferred(self._awaiting_peer.remove)
        self._awaiting_peer.append(waiting)
        return waiting

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
            self._received(message, (unmapped(addr[0]), addr[1]), len(datagram))
        except Exception:
            self._drop("error")
            _log.failure("handling a datagram from {host}:{port}", host=addr[0], port=addr[1])

    def _drop(self, reason: str) -> None:
        self.counters[f"dropped_{reason}"] += 1

    def _received(self, message: Message, address: tuple[str, int], size: int) -> None:
        header = message.header
        if header.sender_id == self.node_id:
            # Our own request came back: the address asked is ours (a bootstrap list or
            # a headless Service usually names this node too).
            pending = self._pending.get(header.txid)
            if pending is not None and (pending.contact.host, pending.contact.port) == address:
                self.own_addresses.add(address)
            self._drop("self")
            return
        if self.secret is not None and not (
            self._bound_here(message, address) and self._fresh(header)
        ):
            return
        if message.type in RESPONSES:
            if self._answered(message, address):
                self._peer_seen(address[0], header.registry_port)
            return
        self._claimed(Contact(header.sender_id, address[0], address[1]))
        self._peer_seen(address[0], header.registry_port)
        self._reply(message, address, size)

    def _bound_here(self, message: Message, address: tuple[str, int]) -> bool:
        """A signed datagram must be for this node (or, a Ping, for whoever listens
        here) and come from the address it was signed for: one copied by a stranger
        and sent to another node, or from the stranger's own address, is dropped."""
        binding = message.binding
        assert binding is not None  # decode sets it whenever there is a secret
        receiver = binding.receiver_id
        if receiver != self.node_id and not (
            receiver == NO_RECEIVER and isinstance(message.body, Ping)
        ):
            self._drop("wrong_receiver")
            return False
        if (binding.sender_host, binding.sender_port) != (canonical_host(address[0]), address[1]):
            self._drop("wrong_source")
            return False
        return True

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

    def _answered(self, message: Message, address: tuple[str, int]) -> bool:
        """A response: accepted only from the address asked, under the id asked; whether
        it was."""
        txid = message.header.txid
        pending = self._pending.get(txid)
        if pending is None or (pending.contact.host, pending.contact.port) != address:
            self._drop("unexpected")
            return False
        self._forget(txid)
        # It answered our random transaction id from its address: it lives there.
        sender = Contact(message.header.sender_id, address[0], address[1])
        asked = pending.contact
        if len(asked.node_id) == ID_LENGTH and asked.node_id != sender.node_id:
            self._drop("wrong_node")
            if pending.evicts:
                self.table.failed(asked)
            self._admit(sender)
            pending.result.errback(
                AnsweredByAnother(f"{address[0]}:{address[1]} answers as another node")
            )
            return False
        self.addresses.learn(sender.node_id, sender.host)
        self._admit(sender)
        pending.result.callback(message)
        return True

    # Who enters the routing table

    def _claimed(self, contact: Contact) -> None:
        """A request's sender: a known id is seen again (or its claim from another
        address refused); an unknown one with a free slot waiting is pinged, and enters
        the table only if it answers. Without a free slot it stays out: it is let in,
        or cached as a replacement, once it answers a request of ours."""
        if self.table.get(contact.node_id) is not None:
            self._admit(contact)
        elif self.table.has_room(contact):
            self._check(contact)
        elif self.table.host_full(contact.host):
            self._drop("host_full")

    def heard_of(self, contact: Contact) -> None:
        """A contact named in another node's answer: pinged if its bucket is empty.

        Only nodes that answer us enter the table, as Kademlia requires. But when
        many nodes join at once, each one's searches reach only nodes as near as
        itself, and a whole half of the id space can end up knowing nobody in the
        other half of its side: searches there then stop short, at the wrong nodes.
        A node named by someone else is the only way across; a ping lets it in.
        """
        if contact.node_id != self.node_id and self.table.bucket_size(contact.node_id) == 0:
            self._check(contact)

    def _admit(self, contact: Contact) -> None:
        """``contact`` answered from its address: into the table, unless its id lives
        at another address or its address holds enough contacts. Whoever stands in
        its way is pinged (unless seen lately); if that one is gone, the newcomer is
        pinged again and takes the place."""
        was_empty = not len(self.table)
        seen = self.table.seen(contact, self.clock.seconds())
        if seen.refused is not None:
            self._drop(seen.refused)
        if seen.check is not None:
            # A refused newcomer is not cached: it must answer again once the way is free.
            self._check(seen.check, (lambda: self._check(contact)) if seen.refused else None)
        if was_empty and len(self.table):
            waiting, self._awaiting_peer = self._awaiting_peer, []
            for peer_known in waiting:
                peer_known.callback(None)

    def _check(self, contact: Contact, if_silent: Callable[[], object] | None = None) -> None:
        """Ping ``contact`` (its answer admits it), one ping per address at a time and a
        bounded number in all: however many requests a stranger forges, this node
        sends a few pings. ``if_silent`` runs if it does not answer."""
        address = (contact.host, contact.port)
        if address in self._checking or len(self._checking) >= self.limits.checks_in_flight:
            return
        self._checking.add(address)

        def done(result: Message | Failure) -> None:
            self._checking.discard(address)
            if isinstance(result, Failure) and if_silent is not None:
                if_silent()

        self.ping(contact).addBoth(done)

    # Answering

    def _reply(self, message: Message, address: tuple[str, int], size: int) -> None:
        """Answer a request; bytes beyond the request's own come out of the sender's
        allowance, and a larger answer than it covers is cut to fit: this node is no
        amplifier for a forged source address."""
        if self.transport is None:
            return
        txid, asker = message.header.txid, message.header.sender_id
        body = self._answer(message, address)
        data = self._datagram(txid, body, address, asker)
        extra = len(data) - size
        if extra > 0:
            allowed = min(
                self._answer_budget.available(address[0]), self._total_budget.available("")
            )
            granted = min(extra, allowed)
            self._answer_budget.take(address[0], granted)
            self._total_budget.take("", granted)
            if granted < extra:
                self.counters["answers_trimmed"] += 1
                body = _trimmed(body, body_room(size + int(granted), self.secret is not None))
                data = self._datagram(txid, body, address, asker)
        self._write(data, address)

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
            providers = tuple(self.records.providers_of(body.key))
            closer = tuple(self.table.closest(body.key, self.k))
            fitted_providers, fitted_closer = fit_providers(providers, closer)
            return Providers(fitted_providers, fitted_closer)
        # A record is for the address the datagram came from, whatever id it claims.
        provider = Provider(message.header.sender_id, address[0], message.header.registry_port)
        if isinstance(body, AddProvider):
            for key in body.keys:
                outcome = self.records.store(key, provider)
                if not outcome.stored:
                    self._drop("store_full")
                elif outcome.evicted:
                    self.counters["records_evicted"] += 1
        elif isinstance(body, RemoveProvider):
            for key in body.keys:
                self.records.remove(key, address[0])
        return Ack()

    def stopProtocol(self) -> None:
        for txid in list(self._pending):
            pending = self._pending.pop(txid)
            if pending.timeout.active():
                pending.timeout.cancel()
            pending.result.errback(RequestTimeout("the DHT stopped"))


def _trimmed(body: Body, room: int) -> Body:
    """``body`` cut to ``room`` bytes: closer contacts go first, then providers."""
    if isinstance(body, Nodes):
        return Nodes(fit_contacts(body.contacts, room))
    if isinstance(body, Providers):
        return Providers(*fit_providers(body.providers, body.closer, room))
    return body
