"""The DHT's routing table and node ids: pure logic, no reactor."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spegel_tx.routing.kademlia.messages import ID_LENGTH, Contact
from spegel_tx.routing.kademlia.node import (
    distance,
    key_id,
    load_or_create_node_id,
    random_node_id,
)
from spegel_tx.routing.kademlia.table import BITS, RECHECK_AFTER, REPLACEMENTS, RoutingTable, Seen

ids = st.binary(min_size=ID_LENGTH, max_size=ID_LENGTH)


def contact(node_id: bytes, port: int = 5001) -> Contact:
    """A node at an address of its own, as every node of a cluster has."""
    host = str(ipaddress.IPv6Address(hashlib.sha256(node_id).digest()[:16]))
    return Contact(node_id, host, port)


def shared_prefix(a: bytes, b: bytes) -> int:
    """Leading equal bits, counted bit by bit: independent of the table's arithmetic."""
    bits_a = "".join(f"{byte:08b}" for byte in a)
    bits_b = "".join(f"{byte:08b}" for byte in b)
    count = 0
    while count < len(bits_a) and bits_a[count] == bits_b[count]:
        count += 1
    return count


def id_in_bucket(own: bytes, index: int, suffix: int) -> bytes:
    """An id sharing exactly ``index`` leading bits with ``own``, varied by ``suffix``."""
    own_int = int.from_bytes(own, "big")
    flip = 1 << (BITS - 1 - index)
    value = (own_int ^ flip) & ~(flip - 1) | (suffix % flip)
    return value.to_bytes(ID_LENGTH, "big")


OWN = bytes(ID_LENGTH)


# node.py


def test_key_id_is_sha256_of_the_key() -> None:
    key = "docker.io/library/nginx:1.27"
    assert key_id(key) == hashlib.sha256(key.encode()).digest()
    assert len(key_id("sha256:" + "ab" * 32)) == ID_LENGTH


def test_random_node_ids_differ() -> None:
    assert len(random_node_id()) == ID_LENGTH
    assert random_node_id() != random_node_id()


@given(ids, ids, ids)
def test_distance_is_a_metric(a: bytes, b: bytes, c: bytes) -> None:
    assert distance(a, a) == 0
    assert distance(a, b) == distance(b, a)
    assert (distance(a, b) == 0) == (a == b)
    assert distance(a, c) <= distance(a, b) + distance(b, c)


def test_node_id_without_data_dir_is_fresh() -> None:
    assert load_or_create_node_id("") != load_or_create_node_id("")


def test_node_id_persists_and_creates_directories(tmp_path) -> None:
    data_dir = tmp_path / "a" / "b"
    first = load_or_create_node_id(str(data_dir))
    assert len(first) == ID_LENGTH
    assert load_or_create_node_id(str(data_dir)) == first
    path = data_dir / "node-id"
    assert path.read_text() == first.hex() + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(data_dir) == ["node-id"]  # no temporary file left behind


def test_node_id_reads_an_existing_file(tmp_path) -> None:
    (tmp_path / "node-id").write_text("AB" * ID_LENGTH + "\n")
    assert load_or_create_node_id(str(tmp_path)) == b"\xab" * ID_LENGTH


@pytest.mark.parametrize(
    "content",
    [b"", b"ab" * 31, b"ab" * 33, b"zz" * ID_LENGTH, b"ab " * ID_LENGTH, b"\xff" * 64],
)
def test_corrupt_node_id_is_refused(tmp_path, content: bytes) -> None:
    path = tmp_path / "node-id"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path)):
        load_or_create_node_id(str(tmp_path))
    assert path.read_bytes() == content  # never silently replaced


# Bucket index


def test_bucket_index_edges() -> None:
    table = RoutingTable(OWN)
    assert table.bucket_index(b"\x80" + bytes(ID_LENGTH - 1)) == 0
    assert table.bucket_index(b"\x40" + bytes(ID_LENGTH - 1)) == 1
    assert table.bucket_index(b"\x01" + bytes(ID_LENGTH - 1)) == 7
    assert table.bucket_index(bytes(ID_LENGTH - 1) + b"\x01") == 255
    assert table.bucket_index(OWN) == 255


@given(ids, ids)
def test_bucket_index_is_the_shared_prefix_length(own: bytes, other: bytes) -> None:
    table = RoutingTable(own)
    assert table.bucket_index(other) == min(shared_prefix(own, other), BITS - 1)


# seen / failed / remove


def test_own_id_is_never_added() -> None:
    table = RoutingTable(OWN)
    assert table.seen(contact(OWN), 0.0) == Seen()
    assert len(table) == 0
    assert table.get(OWN) is None
    assert table.closest(OWN, 10) == []


def test_wrong_length_ids_are_ignored() -> None:
    table = RoutingTable(OWN)
    assert table.seen(contact(b"\x01" * 31), 0.0) == Seen()
    assert len(table) == 0
    table.failed(contact(b"short"))
    table.touch(b"x" * 40, 0.0)
    with pytest.raises(ValueError):
        RoutingTable(b"short")


def test_seen_again_updates_recency() -> None:
    table = RoutingTable(OWN, k=2)
    a, b = id_in_bucket(OWN, 0, 1), id_in_bucket(OWN, 0, 2)
    table.seen(contact(a), 0.0)
    table.seen(contact(b), 1.0)
    assert table.seen(contact(a), 2.0) == Seen()
    assert len(table) == 2
    # a is now the most recent, so b is the one to ping when a newcomer arrives.
    assert table.seen(contact(id_in_bucket(OWN, 0, 3)), 3.0) == Seen(check=contact(b))


def test_a_live_id_keeps_its_address() -> None:
    table = RoutingTable(OWN)
    a = contact(id_in_bucket(OWN, 0, 1))
    table.seen(a, 0.0)
    thief = Contact(a.node_id, "10.9.9.9", 6001)
    # Refused, and the holder named for a ping: is it still there?
    assert table.seen(thief, 1.0) == Seen(check=a, refused="id_conflict")
    # Claims that follow are refused without another ping, for a while.
    assert table.seen(thief, RECHECK_AFTER) == Seen(refused="id_conflict")
    assert table.seen(thief, 1.0 + RECHECK_AFTER) == Seen(check=a, refused="id_conflict")
    assert table.get(a.node_id) == a
    # Only if the holder does not answer does its slot free up.
    table.failed(a)
    assert table.seen(thief, 20.0) == Seen()
    assert table.get(a.node_id) == thief


def test_a_failure_at_another_address_evicts_nobody() -> None:
    table = RoutingTable(OWN)
    a = contact(id_in_bucket(OWN, 0, 1))
    table.seen(a, 0.0)
    table.failed(Contact(a.node_id, "10.9.9.9", a.port))
    table.failed(Contact(a.node_id, a.host, a.port + 1))
    assert table.get(a.node_id) == a


def test_one_address_holds_few_contacts() -> None:
    table = RoutingTable(OWN, per_host=2)
    forged = [Contact(id_in_bucket(OWN, n % 200, n), "10.6.6.6", 5001) for n in range(60)]
    results = [table.seen(c, float(n)) for n, c in enumerate(forged)]
    assert [c.node_id for c in table.contacts()] == [forged[0].node_id, forged[1].node_id]
    assert results[:2] == [Seen(), Seen()]
    # The stalest of the two is named: if it is gone, a newcomer may take its place.
    assert results[2:] == [Seen(check=forged[0], refused="host_full")] * 58
    table.failed(forged[0])
    assert table.seen(forged[2], 100.0) == Seen()
    assert len(table) == 2
    # Other addresses are unaffected.
    assert table.seen(contact(id_in_bucket(OWN, 3, 1)), 100.0) == Seen()


def test_replacements_count_towards_their_address() -> None:
    table = RoutingTable(OWN, k=1, per_host=2)
    table.seen(contact(id_in_bucket(OWN, 0, 0)), 0.0)
    waiting = [Contact(id_in_bucket(OWN, 0, n), "10.6.6.6", 5001) for n in (1, 2, 3)]
    assert table.seen(waiting[0], 1.0).refused is None
    assert table.seen(waiting[1], 1.0).refused is None
    assert table.seen(waiting[2], 1.0).refused == "host_full"


def test_full_bucket_returns_least_recently_seen_and_keeps_newcomer() -> None:
    k = 3
    table = RoutingTable(OWN, k=k)
    members = [contact(id_in_bucket(OWN, 4, n)) for n in range(k)]
    for member in members:
        assert table.seen(member, 0.0) == Seen()
    newcomer = contact(id_in_bucket(OWN, 4, 99))
    assert table.seen(newcomer, 1.0) == Seen(check=members[0])
    assert table.get(newcomer.node_id) is None
    assert len(table) == k
    # Another bucket is unaffected by this one being full.
    assert table.seen(contact(id_in_bucket(OWN, 5, 1)), 1.0) == Seen()
    assert len(table) == k + 1


def test_answered_ping_keeps_the_old_contact() -> None:
    table = RoutingTable(OWN, k=2)
    old, other = contact(id_in_bucket(OWN, 0, 1)), contact(id_in_bucket(OWN, 0, 2))
    table.seen(old, 0.0)
    table.seen(other, 0.0)
    newcomer = contact(id_in_bucket(OWN, 0, 3))
    assert table.seen(newcomer, 1.0) == Seen(check=old)
    assert table.seen(old, 2.0) == Seen()  # the ping was answered
    assert {c.node_id for c in table.contacts()} == {old.node_id, other.node_id}
    # The newcomer still waits: when ``other`` fails, it takes the slot.
    table.failed(other)
    assert table.get(newcomer.node_id) == newcomer


def test_failed_promotes_the_most_recent_replacement() -> None:
    table = RoutingTable(OWN, k=2)
    members = [contact(id_in_bucket(OWN, 0, n)) for n in (1, 2)]
    for member in members:
        table.seen(member, 0.0)
    early, late = contact(id_in_bucket(OWN, 0, 3)), contact(id_in_bucket(OWN, 0, 4))
    table.seen(early, 1.0)
    table.seen(late, 2.0)
    table.failed(members[0])
    assert table.get(members[0].node_id) is None
    assert table.get(late.node_id) == late
    assert table.get(early.node_id) is None
    table.failed(members[1])
    assert table.get(early.node_id) == early
    # No replacements left: a failure just shrinks the bucket.
    table.failed(late)
    assert {c.node_id for c in table.contacts()} == {early.node_id}


def test_failed_replacement_is_never_promoted() -> None:
    table = RoutingTable(OWN, k=1)
    member = contact(id_in_bucket(OWN, 0, 1))
    table.seen(member, 0.0)
    waiting = contact(id_in_bucket(OWN, 0, 2))
    table.seen(waiting, 0.0)
    table.failed(waiting)
    table.failed(member)
    assert len(table) == 0


def test_replacement_cache_is_bounded() -> None:
    table = RoutingTable(OWN, k=1)
    table.seen(contact(id_in_bucket(OWN, 0, 0)), 0.0)
    newcomers = [contact(id_in_bucket(OWN, 0, n)) for n in range(1, REPLACEMENTS + 5)]
    for newcomer in newcomers:
        table.seen(newcomer, 0.0)
    promoted = []
    while len(table):
        current = table.contacts()[0]
        table.failed(current)
        promoted.extend(table.contacts())
    assert promoted == list(reversed(newcomers[-REPLACEMENTS:]))


def test_remove_and_unknown_ids() -> None:
    table = RoutingTable(OWN)
    a = contact(id_in_bucket(OWN, 3, 1))
    table.seen(a, 0.0)
    table.remove(random_node_id())
    table.failed(contact(random_node_id()))
    assert table.get(a.node_id) == a
    table.remove(a.node_id)
    assert table.get(a.node_id) is None
    assert len(table) == 0


@settings(max_examples=50)
@given(own=ids, others=st.lists(ids, max_size=200), k=st.integers(1, 8))
def test_buckets_never_exceed_k(own: bytes, others: list[bytes], k: int) -> None:
    table = RoutingTable(own, k=k)
    for n, other in enumerate(others):
        table.seen(contact(other), float(n))
    stored = table.contacts()
    assert len(stored) == len(table) == len({c.node_id for c in stored})
    assert own not in {c.node_id for c in stored}
    per_bucket: dict[int, int] = {}
    for c in stored:
        index = table.bucket_index(c.node_id)
        per_bucket[index] = per_bucket.get(index, 0) + 1
    assert all(count <= k for count in per_bucket.values())
    # Everyone offered is either stored or its bucket is full.
    for other in set(others) - {own}:
        assert table.get(other) is not None or per_bucket[table.bucket_index(other)] == k


# closest


@settings(max_examples=100)
@given(
    own=ids,
    others=st.lists(ids, max_size=300),
    target=ids,
    count=st.integers(0, 40),
    k=st.integers(1, 20),
)
def test_closest_equals_brute_force(
    own: bytes, others: list[bytes], target: bytes, count: int, k: int
) -> None:
    table = RoutingTable(own, k=k)
    for other in others:
        table.seen(contact(other), 0.0)
    expected = sorted(table.contacts(), key=lambda c: distance(c.node_id, target))[:count]
    assert table.closest(target, count) == expected


def test_closest_on_a_large_table() -> None:
    table = RoutingTable(random_node_id())
    for _ in range(3000):
        table.seen(contact(random_node_id()), 0.0)
    for _ in range(20):
        target = random_node_id()
        expected = sorted(table.contacts(), key=lambda c: distance(c.node_id, target))[:20]
        assert table.closest(target, 20) == expected


def test_closest_to_own_id_excludes_it() -> None:
    own = random_node_id()
    table = RoutingTable(own)
    for _ in range(50):
        table.seen(contact(random_node_id()), 0.0)
    assert all(c.node_id != own for c in table.closest(own, 100))
    assert len(table.closest(own, 100)) == len(table)


# refresh


@given(own=ids, index=st.integers(0, BITS - 1))
def test_random_id_in_lands_in_its_bucket(own: bytes, index: int) -> None:
    table = RoutingTable(own)
    assert table.bucket_index(table.random_id_in(index)) == index


def test_random_id_in_rejects_bad_indexes() -> None:
    table = RoutingTable(OWN)
    with pytest.raises(ValueError):
        table.random_id_in(-1)
    with pytest.raises(ValueError):
        table.random_id_in(BITS)


def test_empty_table_has_no_stale_buckets() -> None:
    assert RoutingTable(OWN).stale_buckets(1e9, 60.0) == []


def test_stale_buckets_cover_up_to_the_deepest_populated_bucket() -> None:
    own = random_node_id()
    table = RoutingTable(own)
    table.seen(contact(id_in_bucket(own, 5, 1)), 100.0)
    stale = table.stale_buckets(100.0, 60.0)
    # Buckets 0-4 were never touched; bucket 5 just was; deeper ones are out of range.
    assert [table.bucket_index(target) for target in stale] == [0, 1, 2, 3, 4]
    assert [table.bucket_index(t) for t in table.stale_buckets(160.0, 60.0)] == list(range(6))


def test_touch_and_contact_activity_refresh_a_bucket() -> None:
    own = random_node_id()
    table = RoutingTable(own)
    table.seen(contact(id_in_bucket(own, 2, 1)), 0.0)
    table.touch(table.random_id_in(0), 0.0)
    table.touch(table.random_id_in(1), 0.0)
    assert table.stale_buckets(59.0, 60.0) == []
    table.touch(table.random_id_in(1), 30.0)
    table.seen(contact(id_in_bucket(own, 2, 1)), 50.0)
    assert [table.bucket_index(t) for t in table.stale_buckets(60.0, 60.0)] == [0]
    assert [table.bucket_index(t) for t in table.stale_buckets(110.0, 60.0)] == [0, 1, 2]


@settings(max_examples=50)
@given(own=ids, others=st.lists(ids, min_size=1, max_size=50))
def test_stale_ids_land_in_distinct_buckets(own: bytes, others: list[bytes]) -> None:
    table = RoutingTable(own)
    for other in others:
        table.seen(contact(other), 0.0)
    indexes = [table.bucket_index(t) for t in table.stale_buckets(1000.0, 60.0)]
    deepest = max((table.bucket_index(c.node_id) for c in table.contacts()), default=-1)
    assert indexes == list(range(deepest + 1))
