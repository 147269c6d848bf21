"""Placement: each key's k closest nodes, found with a few searches per region of the id
space rather than one per key.

Pure: the node search is a fake over a fixed set of random node ids that answers
with the true k closest, so every answer of ``place`` and ``nodes_in`` can be checked
against a brute-force one, and the searches counted.
"""

from __future__ import annotations

import random
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spegel_tx.routing.kademlia.messages import ID_LENGTH, Contact
from spegel_tx.routing.kademlia.node import distance
from spegel_tx.routing.kademlia.placement import BITS, Region, nodes_in, place

T = TypeVar("T")


class ExactSearch:
    """A NodeSearch over a fixed set of nodes: the true k closest to each target, closest
    first (what an iterative find-node returns on a healthy network)."""

    def __init__(self, nodes: list[Contact], k: int) -> None:
        self.nodes = nodes
        self.k = k
        self.targets: list[bytes] = []

    async def __call__(self, target: bytes) -> list[Contact]:
        self.targets.append(target)
        return closest(self.nodes, target, self.k)


def closest(nodes: list[Contact], target: bytes, k: int) -> list[Contact]:
    """The brute-force answer: every node ranked by XOR distance."""
    return sorted(nodes, key=lambda contact: distance(contact.node_id, target))[:k]


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """The fake search never waits, so the coroutine finishes on its first step."""
    try:
        coroutine.send(None)
    except StopIteration as finished:
        return finished.value  # type: ignore[no-any-return]
    raise AssertionError("placement waited on something other than the search")


def ids_near(rng: random.Random, count: int, base: bytes, shared_bits: int) -> list[bytes]:
    """``count`` distinct random ids whose first ``shared_bits`` bits are ``base``'s."""
    keep = ((1 << shared_bits) - 1) << (BITS - shared_bits)
    fixed = int.from_bytes(base, "big") & keep
    ids: set[bytes] = set()
    while len(ids) < count:
        value = fixed | (int.from_bytes(rng.randbytes(ID_LENGTH), "big") & ~keep)
        ids.add(value.to_bytes(ID_LENGTH, "big"))
    return sorted(ids)


def network(rng: random.Random, size: int, shared_bits: int = 0) -> list[Contact]:
    base = rng.randbytes(ID_LENGTH)
    return [
        Contact(node_id, "10.0.0.1", 5001) for node_id in ids_near(rng, size, base, shared_bits)
    ]


def assert_placed_exactly(
    placement: dict[bytes, list[Contact]], keys: list[bytes], nodes: list[Contact], k: int
) -> None:
    assert set(placement) == set(keys)
    for key in keys:
        assert placement[key] == closest(nodes, key, k), key.hex()


# place


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    size=st.integers(min_value=0, max_value=120),
    k=st.sampled_from([1, 2, 3, 5, 20]),
    key_count=st.integers(min_value=0, max_value=300),
    node_bits=st.sampled_from([0, 0, 0, 8, 200]),
    key_bits=st.sampled_from([0, 0, 4, 16]),
)
def test_every_key_lands_on_its_k_closest_nodes_and_searches_stay_below_twice_the_keys(
    seed: int, size: int, k: int, key_count: int, node_bits: int, key_bits: int
) -> None:
    """Whatever the network (empty, smaller than k, nodes packed into a tiny corner of
    the id space) and whatever the keys (scattered or all in one region), each key's
    placement is its true k closest nodes, closest first; and placing never costs more
    than about two searches per key (one, where a region's exploration was abandoned
    as dearer than searching its keys one by one, wasted)."""
    rng = random.Random(seed)
    nodes = network(rng, size, node_bits)
    keys = ids_near(rng, key_count, rng.randbytes(ID_LENGTH), key_bits)
    search = ExactSearch(nodes, k)
    placement = run(place(keys, search, k))
    assert_placed_exactly(placement, keys, nodes, k)
    assert len(search.targets) <= max(2 * len(keys) - 1, 0)


@pytest.mark.parametrize("size", [0, 1, 7, 19, 20, 21])
def test_a_network_of_fewer_than_k_nodes_needs_two_searches(size: int) -> None:
    """Fewer than k + 1 nodes: the first search returns them all, a second one from the
    far side of the id space returns the same ones, and they hold every key (each key's
    list ranked for that key)."""
    rng = random.Random(size)
    nodes = network(rng, size)
    keys = [rng.randbytes(ID_LENGTH) for _ in range(50)]
    search = ExactSearch(nodes, 20)
    placement = run(place(keys, search, 20))
    assert_placed_exactly(placement, keys, nodes, 20)
    if size == 0:
        assert len(search.targets) == 1
    elif size < 20:
        assert len(search.targets) == 2


class CloggedSearch(ExactSearch):
    """Near ``around``, answers still name nodes that have gone: a search there comes
    back with only the live ``short`` of the k closest, though the network is large."""

    def __init__(self, nodes: list[Contact], k: int, around: Region, short: int) -> None:
        super().__init__(nodes, k)
        self.around = around
        self.short = short

    async def __call__(self, target: bytes) -> list[Contact]:
        found = await super().__call__(target)
        return found[: self.short] if target in self.around else found


def test_a_short_answer_in_a_large_network_places_only_its_own_key_there() -> None:
    """A search that came back with fewer than k nodes is no proof that the network is
    that small: the other keys are placed by their own searches, not heaped on those
    few nodes (where no lookup would look for them)."""
    rng = random.Random(6)
    nodes = network(rng, 200)
    keys = sorted(rng.randbytes(ID_LENGTH) for _ in range(40))
    clogged = Region.around(keys[0], 12)
    search = CloggedSearch(nodes, 20, clogged, short=15)
    placement = run(place(keys, search, 20))
    assert placement[keys[0]] == closest(nodes, keys[0], 20)[:15]
    for key in keys[1:]:
        expected = closest(nodes, key, 20)
        assert placement[key] == (expected[:15] if key in clogged else expected)


@pytest.mark.parametrize(("size", "key_count"), [(200, 2000), (200, 5000), (400, 4000)])
def test_many_keys_cost_a_few_searches_per_region_not_one_per_key(
    size: int, key_count: int
) -> None:
    """With k = 20 and ten keys or more per node, the searches depend on the nodes, not
    the keys: about two per region of k nodes (its first key's search, and one to
    enumerate the half it did not cover). Bound: four per k nodes."""
    rng = random.Random(size + key_count)
    nodes = network(rng, size)
    keys = [rng.randbytes(ID_LENGTH) for _ in range(key_count)]
    search = ExactSearch(nodes, 20)
    placement = run(place(keys, search, 20))
    assert_placed_exactly(placement, keys, nodes, 20)
    assert len(search.targets) <= 4 * (size / 20 + 1)
    assert len(search.targets) * 40 < key_count


def test_keys_clustered_in_one_region_are_placed_with_a_handful_of_searches() -> None:
    rng = random.Random(3)
    nodes = network(rng, 300)
    keys = ids_near(rng, 500, rng.randbytes(ID_LENGTH), shared_bits=12)
    search = ExactSearch(nodes, 20)
    placement = run(place(keys, search, 20))
    assert_placed_exactly(placement, keys, nodes, 20)
    assert len(search.targets) <= 4


def test_duplicate_keys_are_placed_once() -> None:
    rng = random.Random(4)
    nodes = network(rng, 50)
    key = rng.randbytes(ID_LENGTH)
    search = ExactSearch(nodes, 20)
    placement = run(place([key, key, key], search, 20))
    assert placement == {key: closest(nodes, key, 20)}
    assert len(search.targets) == 1


def test_nodes_packed_together_do_not_blow_up_the_searches() -> None:
    """k = 1, or k nodes sharing 200 bits: telling them apart region by region would take
    up to two searches per bit; placement gives up on that and searches per key."""
    rng = random.Random(5)
    for k, nodes in [(1, network(rng, 60)), (20, network(rng, 25, shared_bits=200))]:
        keys = [rng.randbytes(ID_LENGTH) for _ in range(300)]
        search = ExactSearch(nodes, k)
        placement = run(place(keys, search, k))
        assert_placed_exactly(placement, keys, nodes, k)
        assert len(search.targets) < 2 * len(keys)


# nodes_in and regions


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    size=st.integers(min_value=0, max_value=150),
    k=st.sampled_from([2, 3, 5, 20]),
    length=st.integers(min_value=0, max_value=10),
)
def test_nodes_in_finds_exactly_the_nodes_of_a_region(
    seed: int, size: int, k: int, length: int
) -> None:
    rng = random.Random(seed)
    nodes = network(rng, size)
    anchor = rng.choice(nodes).node_id if nodes else rng.randbytes(ID_LENGTH)
    region = Region.around(anchor, length)
    search = ExactSearch(nodes, k)
    found = run(nodes_in(region, search, k))
    assert found is not None
    assert len(found) == len(set(found))
    assert set(found) == {c for c in nodes if c.node_id in region}
    # Given exactly the searches it needed, it still finishes; given one fewer, it gives up
    # (having spent at most that many).
    needed = len(search.targets)
    assert run(nodes_in(region, ExactSearch(nodes, k), k, limit=needed)) == found
    short = ExactSearch(nodes, k)
    assert run(nodes_in(region, short, k, limit=needed - 1)) is None
    assert len(short.targets) == needed - 1


@given(
    node_id=st.binary(min_size=ID_LENGTH, max_size=ID_LENGTH),
    length=st.integers(min_value=0, max_value=BITS - 1),
)
def test_a_region_holds_its_middle_and_its_halves_split_it(node_id: bytes, length: int) -> None:
    region = Region.around(node_id, length)
    assert node_id in region
    assert region.middle() in region
    low, high = region.halves()
    assert (node_id in low) != (node_id in high)
    assert low.length == high.length == length + 1
    assert low.prefix >> 1 == high.prefix >> 1 == region.prefix
    assert Region.around(node_id, BITS).middle() == node_id
