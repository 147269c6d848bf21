"""The DHT's wire format: compact, versioned, optionally authenticated, never over 1,232 bytes.

Layout (big-endian):

====== ===== =====================================================
offset bytes field
====== ===== =====================================================
0      2     magic ``SX``
2      1     version (1)
3      1     message type
4      8     transaction id
12     32    sender node id
44     2     sender's registry port
46     8     sender's clock, milliseconds since the epoch
54     ...   body
end-32 32    HMAC-SHA256 of all before it (only with a cluster secret)
====== ===== =====================================================

Bodies: an id is 32 bytes; a list is a 1-byte count then its items; an
address is a family byte (4 or 6) then 4 or 16 bytes; a contact or provider
is id + address + 2-byte port.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from collections.abc import Sequence

from spegel_tx.routing.kademlia.messages import (
    BODY_TYPES,
    ID_LENGTH,
    MAX_DATAGRAM,
    Ack,
    AddProvider,
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
VERSION = 1
_HEADER = struct.Struct(">2sBB8s32sHQ")
HEADER_SIZE = _HEADER.size
TAG_SIZE = 32
_WORST_ENTRY = ID_LENGTH + 1 + 16 + 2
"""A contact or provider with an IPv6 address."""

MAX_KEYS_PER_DATAGRAM = (MAX_DATAGRAM - HEADER_SIZE - TAG_SIZE - 1) // ID_LENGTH
_MAX_ENTRIES = (MAX_DATAGRAM - HEADER_SIZE - TAG_SIZE - 2) // _WORST_ENTRY


class DecodeError(Exception):
    """A datagram we will not act on; ``reason`` is a short word for the drop counters."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _address(host: str) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    return bytes([ip.version]) + ip.packed


def _entry(node_id: bytes, host: str, port: int) -> bytes:
    return node_id + _address(host) + struct.pack(">H", port)


def _entries(items: Sequence[Contact] | Sequence[Provider]) -> bytes:
    parts = [bytes([len(items)])]
    for item in items:
        port = item.port if isinstance(item, Contact) else item.registry_port
        parts.append(_entry(item.node_id, item.host, port))
    return b"".join(parts)


def _body(body: Body) -> bytes:
    if isinstance(body, FindNode):
        return body.target
    if isinstance(body, GetProviders):
        return body.key
    if isinstance(body, Nodes):
        return _entries(body.contacts)
    if isinstance(body, Providers):
        return _entries(body.providers) + _entries(body.closer)
    if isinstance(body, AddProvider | RemoveProvider):
        return bytes([len(body.keys)]) + b"".join(body.keys)
    return b""


def encode(message: Message, secret: bytes | None = None) -> bytes:
    header = message.header
    data = _HEADER.pack(
        MAGIC,
        VERSION,
        message.type,
        header.txid,
        header.sender_id,
        header.registry_port,
        header.timestamp_ms,
    ) + _body(message.body)
    if secret is not None:
        data += hmac.new(secret, data, hashlib.sha256).digest()
    if len(data) > MAX_DATAGRAM:
        raise ValueError(f"{message.type.name} of {len(data)} bytes exceeds {MAX_DATAGRAM}")
    return data


class _Reader:
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

    def count(self) -> int:
        return self.take(1)[0]

    def entry(self) -> tuple[bytes, str, int]:
        node_id = self.take(ID_LENGTH)
        family = self.take(1)[0]
        if family not in (4, 6):
            raise DecodeError("address")
        packed = self.take(4 if family == 4 else 16)
        host = str(ipaddress.ip_address(packed))
        (port,) = struct.unpack(">H", self.take(2))
        return node_id, host, port

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
        return Nodes(tuple(Contact(*reader.entry()) for _ in range(reader.count())))
    if kind is MessageType.PROVIDERS:
        providers = tuple(Provider(*reader.entry()) for _ in range(reader.count()))
        closer = tuple(Contact(*reader.entry()) for _ in range(reader.count()))
        return Providers(providers, closer)
    keys = tuple(reader.take(ID_LENGTH) for _ in range(reader.count()))
    return AddProvider(keys) if kind is MessageType.ADD_PROVIDER else RemoveProvider(keys)


def decode(data: bytes, secret: bytes | None = None) -> Message:
    """The message in ``data``, or DecodeError; no other exception, whatever the bytes."""
    if len(data) > MAX_DATAGRAM:
        raise DecodeError("oversize")
    if len(data) < HEADER_SIZE + (TAG_SIZE if secret is not None else 0):
        raise DecodeError("short")
    if secret is not None:
        data, tag = data[:-TAG_SIZE], data[-TAG_SIZE:]
        if not hmac.compare_digest(tag, hmac.new(secret, data, hashlib.sha256).digest()):
            raise DecodeError("auth")
    magic, version, kind, txid, sender_id, registry_port, timestamp_ms = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DecodeError("magic")
    if version != VERSION:
        raise DecodeError("version")
    try:
        message_type = MessageType(kind)
    except ValueError:
        raise DecodeError("type") from None
    reader = _Reader(data, HEADER_SIZE)
    body = _decode_body(message_type, reader)
    reader.finish()
    assert BODY_TYPES[type(body)] is message_type
    return Message(Header(txid, sender_id, registry_port, timestamp_ms), body)


def split_keys(keys: Sequence[bytes]) -> list[tuple[bytes, ...]]:
    """Batches of keys that each fit one AddProvider or RemoveProvider datagram."""
    step = MAX_KEYS_PER_DATAGRAM
    return [tuple(keys[i : i + step]) for i in range(0, len(keys), step)]


def fit_contacts(contacts: tuple[Contact, ...]) -> tuple[Contact, ...]:
    return contacts[:_MAX_ENTRIES]


def fit_providers(
    providers: tuple[Provider, ...], closer: tuple[Contact, ...]
) -> tuple[tuple[Provider, ...], tuple[Contact, ...]]:
    """Providers matter more than closer nodes: closer nodes give way first."""
    providers = providers[:_MAX_ENTRIES]
    return providers, closer[: _MAX_ENTRIES - len(providers)]
