"""Where many keys' provider records go, found with a few node searches per region
of the id space rather than one search per key.

A node advertises every digest it holds (thousands) and republishes them all
every 15 minutes; one iterative search per key would cost it over a hundred
datagrams each time. Instead the keys are sorted by id and taken region by
region: a region is a prefix of the id space holding at least k nodes, so the
k closest nodes to any key inside it are inside it too. Once every node of the
region is known, each of its keys is placed exactly, without further searches.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from spegel_tx.routing.kademlia.messages import ID_LENGTH, Contact
from spegel_tx.routing.kademlia.node import distance, shared_prefix_length

BITS = ID_LENGTH * 8

NodeSearch = Callable[[bytes], Awaitable[list[Contact]]]
"""The k closest live nodes to an id, closest first (an iterative find-node)."""


@dataclass(frozen=True)
class Region:
    """The ids whose first ``length`` bits are ``prefix``."""

    prefix: int
    length: int

    @classmethod
    def around(cls, node_id: bytes, length: int) -> Region:
        return cls(int.from_bytes(node_id, "big") >> (BITS - length), length)

    def __contains__(self, node_id: bytes) -> bool:
        return int.from_bytes(node_id, "big") >> (BITS - self.length) == self.prefix

    def halves(self) -> tuple[Region, Region]:
        return Region(self.prefix << 1, self.length + 1), Region(
            self.prefix << 1 | 1, self.length + 1
        )

    def middle(self) -> bytes:
        """An id in the region, as far from its edges as can be: a search target."""
        if self.length == BITS:
            return self.prefix.to_bytes(ID_LENGTH, "big")
        value = (self.prefix << 1 | 1) << (BITS - self.length - 1)
        return value.to_bytes(ID_LENGTH, "big")


def closest_among(target: bytes, contacts: Sequence[Contact], count: int) -> list[Contact]:
    return heapq.nsmallest(count, contacts, key=lambda c: distance(c.node_id, target))


class _TooCostly(Exception):
    pass


async def nodes_in(
    region: Region, search: NodeSearch, k: int, limit: float = math.inf
) -> list[Contact] | None:
    """Every node of ``region`` that answers; None if finding them would take more than
    ``limit`` searches.

    A search towards a point of the region returns its k closest nodes; if any
    of them lies outside, the region held fewer than k and all of them were
    returned (they are closer than anything outside). Otherwise split in two;
    also when fewer than k came back, all inside: that is no proof of a small
    network, since answers may still name nodes that have gone, in the place of
    live ones. Nodes packed close together (or k = 1, where every region holding
    a node splits) mean splitting down to the bits that tell them apart: up to
    two searches for each of the 256 bits, hence the limit.
    """
    searches = 0

    async def counted(target: bytes) -> list[Contact]:
        nonlocal searches
        searches += 1
        if searches > limit:
            raise _TooCostly()
        return await search(target)

    try:
        return await _nodes_in(region, counted, k)
    except _TooCostly:
        return None


async def _nodes_in(region: Region, search: NodeSearch, k: int) -> list[Contact]:
    found = await search(region.middle())
    if not found or any(c.node_id not in region for c in found) or region.length == BITS:
        return [c for c in found if c.node_id in region]
    low, high = region.halves()
    return await _nodes_in(low, search, k) + await _nodes_in(high, search, k)


def _opposite(node_id: bytes) -> bytes:
    """The id farthest from ``node_id``: its k closest are the farthest nodes from it."""
    return bytes(byte ^ 0xFF for byte in node_id)


def _same_nodes(some: Sequence[Contact], others: Sequence[Contact]) -> bool:
    return {c.node_id for c in some} == {c.node_id for c in others}


async def place(keys: Sequence[bytes], search: NodeSearch, k: int) -> dict[bytes, list[Contact]]:
    """The k closest live nodes of each key, closest first, with searches for a few keys
    only: far fewer than the keys when they are many, and never more than twice as many."""
    pending = sorted(set(keys))
    placement: dict[bytes, list[Contact]] = {}
    while pending:
        first = pending[0]
        closest = await search(first)
        if len(closest) < k:
            # Fewer than k answered: the whole network, or a neighbourhood whose nodes
            # still name some that have gone in the place of live ones (then placing
            # every key here would hide them all). Only a search from the far side of
            # the id space meeting the very same nodes shows it is the whole network.
            if (
                not closest
                or len(pending) == 1
                or _same_nodes(closest, await search(_opposite(first)))
            ):
                return placement | {key: closest_among(key, closest, k) for key in pending}
            placement[first] = closest
            pending = pending[1:]
            continue
        # The region where the farthest of the k closest still shares the prefix holds
        # at least k nodes. Sorted keys: those inside it come first.
        length = min(shared_prefix_length(first, closest[-1].node_id), BITS - 1)
        region = Region.around(first, length)
        inside = next((i for i, key in enumerate(pending) if key not in region), len(pending))
        if inside == 1:
            placement[first] = closest
        else:
            # The half holding ``first`` is nearer than that farthest node, so the search
            # already returned all of it; only the other half needs exploring.
            near, far = sorted(region.halves(), key=lambda half: first not in half)
            # Worth it only if cheaper than a search for each other key of the region.
            rest = await nodes_in(far, search, k, limit=inside - 1)
            if rest is None:
                placement[first] = closest
                for key in pending[1:inside]:
                    placement[key] = await search(key)
            else:
                members = [c for c in closest if c.node_id in near] + rest
                for key in pending[:inside]:
                    placement[key] = closest_among(key, members, k)
        pending = pending[inside:]
    return placement
