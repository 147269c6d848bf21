"""The DHT's messages as values; ``codec.py`` turns them into datagrams and back.

Ids and key hashes are 32 raw bytes (SHA-256). Addresses are IP literals as
the receiver saw them: a node never states its own host, only its ports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

ID_LENGTH = 32
MAX_DATAGRAM = 1232
"""The largest UDP payload that crosses any IPv6 path unfragmented."""


class MessageType(IntEnum):
    PING = 1
    PONG = 2
    FIND_NODE = 3
    NODES = 4
    GET_PROVIDERS = 5
    PROVIDERS = 6
    ADD_PROVIDER = 7
    REMOVE_PROVIDER = 8
    ACK = 9


@dataclass(frozen=True)
class Contact:
    """A node's router address: where to send it datagrams."""

    node_id: bytes
    host: str
    port: int


@dataclass(frozen=True)
class Provider:
    """A node holding a key, and the port of its registry (not its router)."""

    node_id: bytes
    host: str
    registry_port: int


@dataclass(frozen=True)
class Header:
    """What every datagram carries.

    ``txid`` pairs a response with its request; ``sender_id`` and
    ``registry_port`` describe the sender; ``timestamp_ms`` bounds replays
    when datagrams are authenticated.
    """

    txid: bytes
    sender_id: bytes
    registry_port: int
    timestamp_ms: int


@dataclass(frozen=True)
class Binding:
    """Who a signed datagram is for and where it leaves from, under the tag.

    A datagram copied by a stranger and replayed to another node, or sent again
    from the stranger's own address, no longer matches the node and address that
    receive it. ``receiver_id`` is all zeros when the sender does not know it yet
    (a bootstrap or doctor Ping).
    """

    receiver_id: bytes
    sender_host: str
    sender_port: int


NO_RECEIVER = bytes(ID_LENGTH)
"""The receiver id of a Ping to an address whose node is not known yet."""


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class FindNode:
    target: bytes


@dataclass(frozen=True)
class Nodes:
    contacts: tuple[Contact, ...] = ()


@dataclass(frozen=True)
class GetProviders:
    key: bytes


@dataclass(frozen=True)
class Providers:
    providers: tuple[Provider, ...] = ()
    closer: tuple[Contact, ...] = ()


@dataclass(frozen=True)
class AddProvider:
    """The sender holds these keys; its address is the datagram's source."""

    keys: tuple[bytes, ...] = field(default=())


@dataclass(frozen=True)
class RemoveProvider:
    keys: tuple[bytes, ...] = field(default=())


@dataclass(frozen=True)
class Ack:
    pass


Body = (
    Ping | Pong | FindNode | Nodes | GetProviders | Providers | AddProvider | RemoveProvider | Ack
)

BODY_TYPES: dict[type, MessageType] = {
    Ping: MessageType.PING,
    Pong: MessageType.PONG,
    FindNode: MessageType.FIND_NODE,
    Nodes: MessageType.NODES,
    GetProviders: MessageType.GET_PROVIDERS,
    Providers: MessageType.PROVIDERS,
    AddProvider: MessageType.ADD_PROVIDER,
    RemoveProvider: MessageType.REMOVE_PROVIDER,
    Ack: MessageType.ACK,
}

RESPONSES = frozenset((MessageType.PONG, MessageType.NODES, MessageType.PROVIDERS, MessageType.ACK))


@dataclass(frozen=True)
class Message:
    header: Header
    body: Body
    binding: Binding | None = None
    """Present on signed datagrams only."""

    @property
    def type(self) -> MessageType:
        return BODY_TYPES[type(self.body)]
