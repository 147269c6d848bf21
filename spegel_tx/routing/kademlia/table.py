"""Kademlia's routing table: k-buckets by shared-prefix length, least recently seen first.

Pure bookkeeping: the caller passes the time and does the pinging, so the table
can be tested without a reactor.
"""

from __future__ import annotations

import heapq
import os
from collections import OrderedDict
from collections.abc import Callable

from spegel_tx.routing.kademlia.messages import ID_LENGTH, Contact

BITS = ID_LENGTH * 8
REPLACEMENTS = 8
"""Contacts kept per full bucket to take the place of ones that stop answering."""


class _Bucket:
    """Contacts oldest first (the ones to ping before evicting), and a small cache of
    newcomers that arrived while the bucket was full, newest last."""

    def __init__(self) -> None:
        self.contacts: OrderedDict[bytes, Contact] = OrderedDict()
        self.replacements: OrderedDict[bytes, Contact] = OrderedDict()
        self.touched = float("-inf")
        """When a contact or a lookup last landed here; never counts as stale."""


class RoutingTable:
    def __init__(
        self, own_id: bytes, k: int = 20, randbytes: Callable[[int], bytes] = os.urandom
    ) -> None:
        """``randbytes`` draws the refresh targets; a seeded one makes a simulation repeatable."""
        if len(own_id) != ID_LENGTH:
            raise ValueError(f"a node id is {ID_LENGTH} bytes, not {len(own_id)}")
        self.own_id = own_id
        self.k = k
        self._randbytes = randbytes
        self._own = int.from_bytes(own_id, "big")
        self._buckets = [_Bucket() for _ in range(BITS)]
        self._deepest = -1
        """The deepest bucket holding a contact (-1: none): the ones past it are all empty."""
        self._numbers: dict[bytes, int] = {}
        """Each contact's id as an integer, for ranking by XOR without converting it again."""

    def bucket_index(self, node_id: bytes) -> int:
        """How many leading bits ``node_id`` shares with ours: 0 (the far half of the
        id space) to 255; our own id, which shares all 256, maps to 255 too."""
        # shared_prefix_length(self.own_id, node_id), without converting our id each time.
        return min(BITS - (int.from_bytes(node_id, "big") ^ self._own).bit_length(), BITS - 1)

    def _bucket(self, node_id: bytes) -> _Bucket | None:
        """None for ids of the wrong length, which belong in no bucket."""
        if len(node_id) != ID_LENGTH:
            return None
        return self._buckets[self.bucket_index(node_id)]

    def seen(self, contact: Contact, now: float) -> Contact | None:
        """Record a live contact; if its bucket is full, keep it as a replacement and
        return the least recently seen one for the caller to ping (Kademlia's
        ping-before-evict: long-lived nodes are the likeliest to stay)."""
        bucket = self._bucket(contact.node_id)
        if bucket is None or contact.node_id == self.own_id:
            return None
        bucket.touched = now
        if contact.node_id in bucket.contacts:
            bucket.contacts[contact.node_id] = contact
            bucket.contacts.move_to_end(contact.node_id)
            return None
        if len(bucket.contacts) < self.k:
            bucket.replacements.pop(contact.node_id, None)
            bucket.contacts[contact.node_id] = contact
            self._numbers[contact.node_id] = int.from_bytes(contact.node_id, "big")
            self._deepest = max(self._deepest, self.bucket_index(contact.node_id))
            return None
        bucket.replacements[contact.node_id] = contact
        bucket.replacements.move_to_end(contact.node_id)
        while len(bucket.replacements) > REPLACEMENTS:
            bucket.replacements.popitem(last=False)
        return next(iter(bucket.contacts.values()))

    def failed(self, node_id: bytes) -> None:
        """The contact did not answer: its bucket's most recent replacement takes its place."""
        self.remove(node_id)

    def remove(self, node_id: bytes) -> None:
        """Forget a contact, in the bucket and among the replacements; a freed slot goes
        to the most recent replacement, so replacements only wait while a bucket is full."""
        bucket = self._bucket(node_id)
        if bucket is None:
            return
        bucket.replacements.pop(node_id, None)
        if bucket.contacts.pop(node_id, None) is None:
            return
        del self._numbers[node_id]
        if bucket.replacements:
            _, replacement = bucket.replacements.popitem(last=True)
            bucket.contacts[replacement.node_id] = replacement
            self._numbers[replacement.node_id] = int.from_bytes(replacement.node_id, "big")
        while self._deepest >= 0 and not self._buckets[self._deepest].contacts:
            self._deepest -= 1

    def bucket_size(self, node_id: bytes) -> int:
        """How many contacts the bucket where ``node_id`` belongs holds."""
        bucket = self._bucket(node_id)
        return 0 if bucket is None else len(bucket.contacts)

    def get(self, node_id: bytes) -> Contact | None:
        bucket = self._bucket(node_id)
        return None if bucket is None else bucket.contacts.get(node_id)

    def closest(self, target: bytes, count: int) -> list[Contact]:
        """Up to ``count`` contacts, nearest to ``target`` by XOR first (never ourselves).

        Answered for every request, so only the nearest buckets are ranked. With ``b``
        the bucket where ``target`` falls, every contact of bucket ``b`` is nearer to it
        than any contact deeper than ``b``, and those than any of bucket ``b - 1``, then
        ``b - 2`` ... ``0``: buckets are taken in that order until ``count`` are in hand.
        """
        goal = int.from_bytes(target, "big")
        numbers = self._numbers

        def away(contact: Contact) -> int:
            return numbers[contact.node_id] ^ goal

        if len(target) != ID_LENGTH:
            return heapq.nsmallest(count, self.contacts(), key=away)
        index = self.bucket_index(target)
        gathered = list(self._buckets[index].contacts.values())
        if len(gathered) < count:
            for deeper in self._buckets[index + 1 : self._deepest + 1]:
                gathered.extend(deeper.contacts.values())
        for farther in range(min(index - 1, self._deepest), -1, -1):
            if len(gathered) >= count:
                break
            gathered.extend(self._buckets[farther].contacts.values())
        # Rarely many more than ``count``: one sort beats a heap.
        return sorted(gathered, key=away)[: max(count, 0)]

    def contacts(self) -> list[Contact]:
        filled = self._buckets[: self._deepest + 1]
        return [contact for bucket in filled for contact in bucket.contacts.values()]

    def __len__(self) -> int:
        return sum(len(bucket.contacts) for bucket in self._buckets)

    def touch(self, target: bytes, now: float) -> None:
        """A lookup towards ``target`` refreshes its bucket."""
        bucket = self._bucket(target)
        if bucket is not None:
            bucket.touched = now

    def stale_buckets(self, now: float, interval: float) -> list[bytes]:
        """A random id in each bucket nothing has touched for ``interval``: lookups
        towards them keep distant parts of the table fresh.

        Only buckets up to the deepest one holding a contact count: deeper buckets
        cover ids so close to ours that the network almost surely has none.
        """
        return [
            self.random_id_in(index)
            for index in range(self._deepest + 1)
            if now - self._buckets[index].touched >= interval
        ]

    def random_id_in(self, index: int) -> bytes:
        """A random id sharing exactly ``index`` leading bits with ours."""
        if not 0 <= index < BITS:
            raise ValueError(f"bucket index {index} is outside 0..{BITS - 1}")
        flip = 1 << (BITS - 1 - index)
        high = self._own & ~((flip << 1) - 1)
        low = int.from_bytes(self._randbytes(ID_LENGTH), "big") & (flip - 1)
        value = high | ((self._own & flip) ^ flip) | low
        return value.to_bytes(ID_LENGTH, "big")
