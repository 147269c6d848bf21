"""Kademlia's routing table: k-buckets by shared-prefix length, least recently seen first.

Pure bookkeeping: the caller passes the time and does the pinging, so the table
can be tested without a reactor. The caller adds only contacts that answered it
from their address; the table keeps a live id where it first answered (a claim
of it from elsewhere is refused) and holds few contacts per IP address, so one
stranger cannot fill a bucket with made-up ids.
"""

from __future__ import annotations

import heapq
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from spegel_tx.routing.kademlia.messages import ID_LENGTH, Contact

BITS = ID_LENGTH * 8
REPLACEMENTS = 8
"""Contacts kept per full bucket to take the place of ones that stop answering."""

RECHECK_AFTER = 10.0
"""A contact whose id is claimed from another address is pinged at most this often:
however many claims a stranger forges, the live node is asked once in a while."""


@dataclass(frozen=True)
class Seen:
    """What the table made of a contact that answered.

    ``check``: a contact for the caller to ping, which goes if it does not answer
    (the least recently seen of a full bucket, or one in the newcomer's way).
    ``refused``: why the newcomer was not taken, ``id_conflict`` (its id is held at
    another address) or ``host_full`` (its address holds enough contacts); None if
    it was, or waits as a replacement.
    """

    check: Contact | None = None
    refused: str | None = None


_NOTHING = Seen()


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
        self,
        own_id: bytes,
        k: int = 20,
        randbytes: Callable[[int], bytes] = os.urandom,
        per_host: int = 2,
    ) -> None:
        """``randbytes`` draws the refresh targets; a seeded one makes a simulation
        repeatable. ``per_host``: contacts and replacements at one IP address."""
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
        self.per_host = per_host
        self._at_host: dict[str, dict[bytes, None]] = {}
        """The ids of the contacts and replacements at each host."""
        self._last_seen: dict[bytes, float] = {}
        self._checked: dict[bytes, float] = {}
        """When a contact was last named for a ping because its id was claimed elsewhere."""
        self._size = 0

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

    def seen(self, contact: Contact, now: float) -> Seen:
        """Record a contact that answered from its address.

        A full bucket keeps the newcomer as a replacement and names its least recently
        seen contact for the caller to ping (Kademlia's ping-before-evict: long-lived
        nodes are the likeliest to stay). An id held at another address stays there;
        the holder is named for a ping (at most every RECHECK_AFTER), so that a node
        that really moved takes its place once the old address is silent.
        """
        bucket = self._bucket(contact.node_id)
        if bucket is None or contact.node_id == self.own_id:
            return _NOTHING
        node_id = contact.node_id
        held = bucket.contacts.get(node_id) or bucket.replacements.get(node_id)
        if held is not None and (held.host, held.port) != (contact.host, contact.port):
            checked = self._checked.get(node_id, float("-inf"))
            if node_id not in bucket.contacts or now - checked < RECHECK_AFTER:
                return Seen(refused="id_conflict")
            self._checked[node_id] = now
            return Seen(held, "id_conflict")
        bucket.touched = now
        if node_id in bucket.contacts:
            bucket.contacts.move_to_end(node_id)
            self._last_seen[node_id] = now
            return _NOTHING
        if held is None and self.host_full(contact.host):
            return Seen(self._stalest_at(contact.host), "host_full")
        if len(bucket.contacts) < self.k:
            bucket.replacements.pop(node_id, None)
            self._add(bucket, contact, now)
            return _NOTHING
        bucket.replacements[node_id] = contact
        bucket.replacements.move_to_end(node_id)
        self._last_seen[node_id] = now
        self._at_host.setdefault(contact.host, {})[node_id] = None
        while len(bucket.replacements) > REPLACEMENTS:
            _, dropped = bucket.replacements.popitem(last=False)
            self._forget(dropped)
        return Seen(next(iter(bucket.contacts.values())))

    def _add(self, bucket: _Bucket, contact: Contact, now: float) -> None:
        self._size += 1
        bucket.contacts[contact.node_id] = contact
        self._numbers[contact.node_id] = int.from_bytes(contact.node_id, "big")
        self._last_seen[contact.node_id] = now
        self._at_host.setdefault(contact.host, {})[contact.node_id] = None
        self._deepest = max(self._deepest, self.bucket_index(contact.node_id))

    def _forget(self, contact: Contact) -> None:
        self._last_seen.pop(contact.node_id, None)
        self._checked.pop(contact.node_id, None)
        ids = self._at_host.get(contact.host)
        if ids is not None:
            ids.pop(contact.node_id, None)
            if not ids:
                del self._at_host[contact.host]

    def has_room(self, contact: Contact) -> bool:
        """Whether ``contact`` would take a slot at once: worth a ping to let it in."""
        bucket = self._bucket(contact.node_id)
        return (
            bucket is not None
            and contact.node_id != self.own_id
            and len(bucket.contacts) < self.k
            and not self.host_full(contact.host)
        )

    def host_full(self, host: str) -> bool:
        return len(self._at_host.get(host, ())) >= self.per_host

    def _stalest_at(self, host: str) -> Contact | None:
        """The contact at ``host`` seen longest ago (None if it has only replacements)."""
        held = [c for c in map(self.get, self._at_host.get(host, ())) if c is not None]
        return min(held, key=lambda c: self._last_seen[c.node_id], default=None)

    def failed(self, contact: Contact) -> None:
        """``contact`` did not answer: if the table holds its id at that address, the
        bucket's most recent replacement takes its place. The same id at another
        address stays: a stranger cannot evict a node by naming its id with a dead
        address."""
        bucket = self._bucket(contact.node_id)
        if bucket is None:
            return
        held = bucket.contacts.get(contact.node_id) or bucket.replacements.get(contact.node_id)
        if held is not None and (held.host, held.port) == (contact.host, contact.port):
            self.remove(contact.node_id)

    def remove(self, node_id: bytes) -> None:
        """Forget a contact, in the bucket and among the replacements; a freed slot goes
        to the most recent replacement, so replacements only wait while a bucket is full."""
        bucket = self._bucket(node_id)
        if bucket is None:
            return
        replacement = bucket.replacements.pop(node_id, None)
        if replacement is not None:
            self._forget(replacement)
        contact = bucket.contacts.pop(node_id, None)
        if contact is None:
            return
        self._forget(contact)
        self._size -= 1
        del self._numbers[node_id]
        if bucket.replacements:
            _, promoted = bucket.replacements.popitem(last=True)
            self._add(bucket, promoted, self._last_seen[promoted.node_id])
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
        return self._size

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
