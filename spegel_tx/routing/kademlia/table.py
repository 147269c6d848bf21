"""Kademlia's routing table: k-buckets by shared-prefix length, least recently seen first."""

from __future__ import annotations

import os
from collections import OrderedDict

from spegel_tx.routing.kademlia.messages import ID_LENGTH, Contact
from spegel_tx.routing.kademlia.node import distance

BITS = ID_LENGTH * 8
REPLACEMENTS = 8
"""Contacts kept per full bucket to take the place of ones that stop answering."""


class _Bucket:
    def __init__(self) -> None:
        self.contacts: OrderedDict[bytes, Contact] = OrderedDict()
        self.replacements: OrderedDict[bytes, Contact] = OrderedDict()
        self.touched = 0.0


class RoutingTable:
    def __init__(self, own_id: bytes, k: int = 20) -> None:
        self.own_id = own_id
        self.k = k
        self._buckets = [_Bucket() for _ in range(BITS)]

    def bucket_index(self, node_id: bytes) -> int:
        """How many leading bits ``node_id`` shares with ours (0 to 255)."""
        return BITS - distance(self.own_id, node_id).bit_length()

    def _bucket(self, node_id: bytes) -> _Bucket:
        return self._buckets[min(self.bucket_index(node_id), BITS - 1)]

    def seen(self, contact: Contact, now: float) -> Contact | None:
        """Record a live contact; if its bucket is full, return the least recently seen
        one for the caller to ping (Kademlia's ping-before-evict)."""
        if contact.node_id == self.own_id or len(contact.node_id) != ID_LENGTH:
            return None
        bucket = self._bucket(contact.node_id)
        bucket.touched = now
        if contact.node_id in bucket.contacts:
            bucket.contacts[contact.node_id] = contact
            bucket.contacts.move_to_end(contact.node_id)
            return None
        if len(bucket.contacts) < self.k:
            bucket.contacts[contact.node_id] = contact
            return None
        bucket.replacements[contact.node_id] = contact
        bucket.replacements.move_to_end(contact.node_id)
        while len(bucket.replacements) > REPLACEMENTS:
            bucket.replacements.popitem(last=False)
        return next(iter(bucket.contacts.values()))

    def failed(self, node_id: bytes) -> None:
        """The contact stopped answering: its most recent replacement takes its place."""
        if len(node_id) != ID_LENGTH:
            return
        bucket = self._bucket(node_id)
        if bucket.contacts.pop(node_id, None) is not None and bucket.replacements:
            _, replacement = bucket.replacements.popitem(last=True)
            bucket.contacts[replacement.node_id] = replacement

    def remove(self, node_id: bytes) -> None:
        if len(node_id) == ID_LENGTH:
            bucket = self._bucket(node_id)
            bucket.contacts.pop(node_id, None)
            bucket.replacements.pop(node_id, None)

    def get(self, node_id: bytes) -> Contact | None:
        if len(node_id) != ID_LENGTH:
            return None
        return self._bucket(node_id).contacts.get(node_id)

    def closest(self, target: bytes, count: int) -> list[Contact]:
        return sorted(self.contacts(), key=lambda c: distance(c.node_id, target))[:count]

    def contacts(self) -> list[Contact]:
        return [c for bucket in self._buckets for c in bucket.contacts.values()]

    def __len__(self) -> int:
        return sum(len(bucket.contacts) for bucket in self._buckets)

    def touch(self, target: bytes, now: float) -> None:
        """A lookup towards ``target`` refreshes its bucket."""
        self._bucket(target).touched = now

    def stale_buckets(self, now: float, interval: float) -> list[bytes]:
        """A random id in each bucket nothing has touched for ``interval``: lookups
        towards them keep distant parts of the table fresh."""
        highest = max((i for i, b in enumerate(self._buckets) if b.contacts), default=-1)
        return [
            self.random_id_in(index)
            for index in range(highest + 1)
            if now - self._buckets[index].touched >= interval
        ]

    def random_id_in(self, index: int) -> bytes:
        """An id sharing exactly ``index`` leading bits with ours."""
        own = int.from_bytes(self.own_id, "big")
        flip = 1 << (BITS - 1 - index)
        low = int.from_bytes(os.urandom(ID_LENGTH), "big") & (flip - 1)
        prefix = own & ~((flip << 1) - 1) if index else 0
        value = prefix | ((own & flip) ^ flip) | low
        return value.to_bytes(ID_LENGTH, "big")
