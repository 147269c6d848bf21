"""The DHT's wire format: compact, versioned, optionally authenticated, never over 1,232 bytes.

Layout (big-endian):

====== ===== =====================================================
offset bytes field
====== ===== =====================================================
0      2     magic ``SX``
2      1     version (2)
3      1     message type
4      8     transaction id
12     32    sender node id
44     2     sender's registry port
46     8     sender's clock, milliseconds since the epoch
54     ...   body
====== ===== =====================================================

With a cluster secret, a signed trailer follows the body:

====== ===== =====================================================
end-82 32    receiver's node id (zeros: not known yet, Ping only)
end-50 16    sender's address as the receiver sees it (IPv4 as ``::ffff:a.b.c.d``)
end-34 2     sender's router port
end-32 32    HMAC-SHA256 of all before it
====== ===== =====================================================

The trailer binds the datagram to one receiver and one source: replayed to
another node, or from another address, it is dropped (version 1 had no trailer).

Bodies: an id or key is 32 bytes; a list is a 1-byte count then its items;
an address is a family byte (4 or 6) then 4 or 16 bytes; a contact or
provider is id + address + 2-byte port.

=============================== ==========================================
type                            body
=============================== ==========================================
Ping, Pong, Ack                 (empty)
FindNode, GetProviders          id
Nodes                           count, contacts
Providers                       count, providers, count, closer contacts
AddProvider, RemoveProvider     count, keys
=============================== ==========================================

Hosts travel as raw addresses, so a decoded host is the canonical text of
the address, without any IPv6 zone (a zone means nothing to another node).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import struct
from collections.abc import Sequence

from spegel_tx.routing.kademlia.messages import (
    ID_LENGTH,
    MAX_DATAGRAM,
    Ack,
    AddProvider,
    Binding,
    Body,
    Contact,
    FindNode,
    GetProviders,
    Header,
    Message,
    MessageType,
    Nodes,
    Ping,
    Pong,
    Provider,
    Providers,
    RemoveProvider,
)

MAGIC = b"SX"
VERSION = 2
TXID_LENGTH = 8
_HEADER = struct.Struct(">2sBB8s32sHQ")
_PORT = struct.Struct(">H")
_BINDING = struct.Struct(">32s16sH")
HEADER_SIZE = _HEADER.size
BINDING_SIZE = _BINDING.size
TAG_SIZE = hashlib.sha256().digest_size
SIGNED_TRAILER = BINDING_SIZE + TAG_SIZE
_V4_MAPPED = bytes(10) + b"\xff\xff"
_ENTRY_FIXED = ID_LENGTH + 1 + _PORT.size
"""A contact or provider without its address bytes: id, family byte, port."""
_MIN_ENTRY = _ENTRY_FIXED + 4
_MAX_COUNT = 255
_BODY_ROOM = MAX_DATAGRAM - HEADER_SIZE - SIGNED_TRAILER
"""Body bytes left in an authenticated datagram: the worst case callers must plan for."""

MAX_KEYS_PER_DATAGRAM = min(_MAX_COUNT, (_BODY_ROOM - 1) // ID_LENGTH)
"""Keys in one AddProvider or RemoveProvider that fit even with a tag."""


class DecodeError(Exception):
    """A datagram we will not act on; ``reason`` is a short stable word for the drop counters."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Encoding


def _check_bytes(value: bytes, length: int, what: str) -> bytes:
    # struct's "Ns" would silently pad or cut: a wrong length must not become another message.
    if len(value) != length:
        raise ValueError(f"{what} must be {length} bytes, not {len(value)}")
    return value


def _check_uint(value: int, bits: int, what: str) -> int:
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what} {value} does not fit {bits} unsigned bits")
    return value


# A node talks to a bounded set of peers, and each answer lists up to 20 of them: parsing
# their addresses with ``ipaddress`` and building their entries cost more than the rest of
# a datagram, so both directions are cached. Values are immutable and failures are never
# cached; the caches are bounded, so entries a stranger makes up only churn them.


@functools.lru_cache(maxsize=4096)
def _packed(host: str) -> bytes:
    try:
        return ipaddress.ip_address(host).packed
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None


@functools.lru_cache(maxsize=4096)
def _host_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


@functools.lru_cache(maxsize=8192, typed=True)
def _entry(node_id: bytes, host: str, port: int) -> bytes:
    packed = _packed(host)
    return (
        _check_bytes(node_id, ID_LENGTH, "node id")
        + bytes([4 if len(packed) == 4 else 6])
        + packed
        + _PORT.pack(_check_uint(port, 16, "port"))
    )


def _count(items: Sequence[object]) -> bytes:
    if len(items) > _MAX_COUNT:
        raise ValueError(f"{len(items)} items do not fit a 1-byte count")
    return bytes([len(items)])


@functools.lru_cache(maxsize=4096)
def _contact_from(entry: bytes) -> Contact:
    return Contact(*_parsed(entry))


@functools.lru_cache(maxsize=4096)
def _provider_from(entry: bytes) -> Provider:
    return Provider(*_parsed(entry))


def _parsed(entry: bytes) -> tuple[bytes, str, int]:
    """An entry ``_Reader.entry`` has checked: id, family byte, address, port."""
    port_at = len(entry) - _PORT.size
    return (
        entry[:ID_LENGTH],
        _host_text(entry[ID_LENGTH + 1 : port_at]),
        _PORT.unpack(entry[port_at:])[0],
    )


def _contacts(contacts: Sequence[Contact]) -> bytes:
    return _count(contacts) + b"".join(_entry(c.node_id, c.host, c.port) for c in contacts)


def _providers(providers: Sequence[Provider]) -> bytes:
    entries = (_entry(p.node_id, p.host, p.registry_port) for p in providers)
    return _count(providers) + b"".join(entries)


def _keys(keys: Sequence[bytes]) -> bytes:
    return _count(keys) + b"".join(_check_bytes(key, ID_LENGTH, "key") for key in keys)


def _body(body: Body) -> bytes:
    if isinstance(body, FindNode):
        return _check_bytes(body.target, ID_LENGTH, "target")
    if isinstance(body, GetProviders):
        return _check_bytes(body.key, ID_LENGTH, "key")
    if isinstance(body, Nodes):
        return _contacts(body.contacts)
    if isinstance(body, Providers):
        return _providers(body.providers) + _contacts(body.closer)
    if isinstance(body, AddProvider | RemoveProvider):
        return _keys(body.keys)
    return b""


def _tag(secret: bytes, data: bytes) -> bytes:
    return hmac.new(secret, data, hashlib.sha256).digest()


def _binding(binding: Binding) -> bytes:
    packed = _packed(binding.sender_host)
    return _BINDING.pack(
        _check_bytes(binding.receiver_id, ID_LENGTH, "receiver id"),
        _V4_MAPPED + packed if len(packed) == 4 else packed,
        _check_uint(binding.sender_port, 16, "sender port"),
    )


def _unmapped(packed: bytes) -> bytes:
    return packed[len(_V4_MAPPED) :] if packed.startswith(_V4_MAPPED) else packed


def _binding_from(trailer: bytes) -> Binding:
    receiver_id, address, port = _BINDING.unpack(trailer)
    return Binding(receiver_id, _host_text(_unmapped(address)), port)


@functools.lru_cache(maxsize=4096)
def canonical_host(host: str) -> str:
    """``host`` as a binding carries it: no IPv6 zone, an IPv4-mapped address as IPv4.
    ValueError if it is no IP address."""
    return _host_text(_unmapped(_packed(host)))


def encode(message: Message, secret: bytes | None = None) -> bytes:
    """The datagram for ``message``, with its binding and tag when there is a secret.

    ValueError if a field is out of range, a host is not an IP literal, a signed
    message has no binding, or the datagram would exceed MAX_DATAGRAM: callers
    split with ``split_keys`` and the ``fit_*`` helpers, since IP fragments are
    often lost.
    """
    header = message.header
    data = _HEADER.pack(
        MAGIC,
        VERSION,
        message.type,
        _check_bytes(header.txid, TXID_LENGTH, "txid"),
        _check_bytes(header.sender_id, ID_LENGTH, "sender id"),
        _check_uint(header.registry_port, 16, "registry port"),
        _check_uint(header.timestamp_ms, 64, "timestamp"),
    ) + _body(message.body)
    if secret is not None:
        if message.binding is None:
            raise ValueError("a signed datagram needs a binding: its receiver and source")
        data += _binding(message.binding)
        data += _tag(secret, data)
    if len(data) > MAX_DATAGRAM:
        raise ValueError(f"{message.type.name} of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    return data


# Decoding


class _Reader:
    """Reads the body; every shortfall is a DecodeError, never an IndexError."""

    def __init__(self, data: bytes, position: int) -> None:
        self._data = data
        self._position = position

    def take(self, size: int) -> bytes:
        end = self._position + size
        if end > len(self._data):
            raise DecodeError("truncated")
        chunk = self._data[self._position : end]
        self._position = end
        return chunk

    def count(self, item_size: int) -> int:
        """A list's count, refused early if even the smallest items could not all be there."""
        count = self.take(1)[0]
        if count * item_size > len(self._data) - self._position:
            raise DecodeError("count")
        return count

    def entry(self) -> bytes:
        """The bytes of one contact or provider, once its family and length are checked."""
        data, start = self._data, self._position
        family_at = start + ID_LENGTH
        if family_at >= len(data):
            raise DecodeError("truncated")
        family = data[family_at]
        if family not in (4, 6):
            raise DecodeError("address")
        port_at = family_at + 1 + (4 if family == 4 else 16)
        end = port_at + _PORT.size
        if end > len(data):
            raise DecodeError("truncated")
        self._position = end
        return data[start:end]

    def contacts(self) -> tuple[Contact, ...]:
        return tuple(_contact_from(self.entry()) for _ in range(self.count(_MIN_ENTRY)))

    def providers(self) -> tuple[Provider, ...]:
        return tuple(_provider_from(self.entry()) for _ in range(self.count(_MIN_ENTRY)))

    def keys(self) -> tuple[bytes, ...]:
        return tuple(self.take(ID_LENGTH) for _ in range(self.count(ID_LENGTH)))

    def finish(self) -> None:
        if self._position != len(self._data):
            raise DecodeError("trailing")


def _decode_body(kind: MessageType, reader: _Reader) -> Body:
    if kind is MessageType.PING:
        return Ping()
    if kind is MessageType.PONG:
        return Pong()
    if kind is MessageType.ACK:
        return Ack()
    if kind is MessageType.FIND_NODE:
        return FindNode(reader.take(ID_LENGTH))
    if kind is MessageType.GET_PROVIDERS:
        return GetProviders(reader.take(ID_LENGTH))
    if kind is MessageType.NODES:
        return Nodes(reader.contacts())
    if kind is MessageType.PROVIDERS:
        providers = reader.providers()
        return Providers(providers, reader.contacts())
    if kind is MessageType.ADD_PROVIDER:
        return AddProvider(reader.keys())
    return RemoveProvider(reader.keys())


def decode(data: bytes, secret: bytes | None = None) -> Message:
    """The message in ``data``, or DecodeError; no other exception, whatever the bytes.

    Magic and version are checked before the tag so that stray traffic and
    version skew show as such in the counters even in an authenticated
    cluster; nothing else is parsed before the tag is verified.
    """
    if len(data) > MAX_DATAGRAM:
        raise DecodeError("oversize")
    if len(data) < HEADER_SIZE:
        raise DecodeError("short")
    magic, version, kind, txid, sender_id, registry_port, timestamp_ms = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError("magic")
    if version != VERSION:
        raise DecodeError("version")
    binding = None
    if secret is not None:
        if len(data) < HEADER_SIZE + SIGNED_TRAILER:
            raise DecodeError("auth")
        data, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
        if not hmac.compare_digest(tag, _tag(secret, data)):
            raise DecodeError("auth")
        data, trailer = data[:-BINDING_SIZE], data[-BINDING_SIZE:]
        binding = _binding_from(trailer)
    try:
        message_type = MessageType(kind)
    except ValueError:
        raise DecodeError("type") from None
    reader = _Reader(data, HEADER_SIZE)
    body = _decode_body(message_type, reader)
    reader.finish()
    return Message(Header(txid, sender_id, registry_port, timestamp_ms), body, binding)


# Filling datagrams


def _entry_size(host: str) -> int:
    return _ENTRY_FIXED + len(_packed(host))


_SURELY_FIT = (_BODY_ROOM - 2) // (_ENTRY_FIXED + 16)
"""Entries that fit whatever their family (22): k = 20 contacts always do, unmeasured."""


def _prefix_fitting(hosts: Sequence[str], room: int) -> tuple[int, int]:
    """How many leading entries fit in ``room`` bytes, and the bytes they take."""
    used = 0
    for taken, host in enumerate(hosts):
        size = _entry_size(host)
        if taken == _MAX_COUNT or used + size > room:
            return taken, used
        used += size
    return len(hosts), used


def split_keys(keys: Sequence[bytes]) -> list[tuple[bytes, ...]]:
    """Batches of keys that each fit one AddProvider or RemoveProvider datagram."""
    step = MAX_KEYS_PER_DATAGRAM
    return [tuple(keys[i : i + step]) for i in range(0, len(keys), step)]


def body_room(size: int, signed: bool) -> int:
    """Body bytes in a datagram of ``size`` bytes: what an answer may fill when it is
    held to fewer bytes than the largest datagram."""
    return min(size, MAX_DATAGRAM) - HEADER_SIZE - (SIGNED_TRAILER if signed else 0)


def fit_contacts(contacts: Sequence[Contact], room: int = _BODY_ROOM) -> tuple[Contact, ...]:
    """The leading contacts (closest first) that fit one Nodes body of ``room`` bytes
    (by default, what any authenticated datagram has)."""
    if room >= _BODY_ROOM and len(contacts) <= _SURELY_FIT:
        return tuple(contacts)
    taken, _ = _prefix_fitting([c.host for c in contacts], min(room, _BODY_ROOM) - 1)
    return tuple(contacts[:taken])


def fit_providers(
    providers: Sequence[Provider], closer: Sequence[Contact], room: int = _BODY_ROOM
) -> tuple[tuple[Provider, ...], tuple[Contact, ...]]:
    """The leading providers and closer contacts that fit one Providers body of ``room``
    bytes; providers answer the question, so closer contacts give way first."""
    if room >= _BODY_ROOM and len(providers) + len(closer) <= _SURELY_FIT:
        return tuple(providers), tuple(closer)
    room = min(room, _BODY_ROOM) - 2
    taken_providers, used = _prefix_fitting([p.host for p in providers], room)
    taken_closer, _ = _prefix_fitting([c.host for c in closer], room - used)
    return tuple(providers[:taken_providers]), tuple(closer[:taken_closer])
