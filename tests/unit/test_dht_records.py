"""The provider records a node keeps for others: pure bookkeeping on a task.Clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from spegel_tx.routing.kademlia.messages import Provider
from spegel_tx.routing.kademlia.records import ProviderRecords


def key(n: int) -> bytes:
    return n.to_bytes(32, "big")


def at(host: str, node: int = 1, port: int = 5000) -> Provider:
    return Provider(bytes([node]) * 32, host, port)


def test_one_record_per_key_and_address_whatever_id_it_claims() -> None:
    records = ProviderRecords(Clock())
    for node in range(50):
        records.store(key(1), at("10.0.0.9", node))
    assert len(records) == 1
    assert records.providers_of(key(1)) == [at("10.0.0.9", 49)], "the latest id and port"
    records.store(key(1), at("10.0.0.8"))
    assert len(records) == 2


def test_a_record_is_removed_only_by_its_address() -> None:
    records = ProviderRecords(Clock())
    records.store(key(1), at("10.0.0.1"))
    records.remove(key(1), "10.0.0.2")
    records.remove(key(2), "10.0.0.1")
    assert len(records) == 1
    records.remove(key(1), "10.0.0.1")
    assert len(records) == 0
    assert list(records) == []
    assert records.sources() == 0


def test_records_expire_unless_refreshed() -> None:
    clock = Clock()
    records = ProviderRecords(clock, ttl=100.0)
    records.store(key(1), at("10.0.0.1"))
    records.store(key(2), at("10.0.0.1"))
    clock.advance(60)
    records.store(key(1), at("10.0.0.1"))
    clock.advance(40)
    assert records.providers_of(key(2)) == [], "expired records are never named"
    assert records.expire() == 1
    assert list(records) == [key(1)]
    clock.advance(60)
    assert records.expire() == 1
    assert len(records) == 0


def test_an_address_over_its_share_replaces_its_own_oldest() -> None:
    records = ProviderRecords(Clock(), max_records=100, max_per_source=10)
    for n in range(25):
        assert records.store(key(n), at("10.0.0.9")).stored
    assert len(records) == 10
    assert sorted(records) == [key(n) for n in range(15, 25)]


def test_a_full_store_takes_room_from_the_largest_source() -> None:
    records = ProviderRecords(Clock(), max_records=100, max_per_source=80)
    for n in range(80):
        records.store(key(n), at("10.0.0.9"))
    for n in range(20):
        records.store(key(1000 + n), at("10.0.0.1"))
    outcome = records.store(key(2000), at("10.0.0.2"))
    assert outcome.stored and outcome.evicted
    assert len(records) == 100
    assert records.providers_of(key(0)) == [], "the flood's oldest went"
    assert all(records.providers_of(key(1000 + n)) for n in range(20))


def test_when_every_source_holds_as_much_a_newcomer_is_refused() -> None:
    records = ProviderRecords(Clock(), max_records=4, max_per_source=4)
    for n in range(4):
        records.store(key(n), at(f"10.0.0.{n}"))
    assert not records.store(key(9), at("10.0.0.9")).stored
    assert records.sources() == 4
    # A source at the top may still rotate its own.
    records.store(key(10), at("10.0.0.1"))
    assert len(records) == 4


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.integers(0, 6), st.booleans()),
        max_size=300,
    )
)
def test_the_bounds_hold_whatever_arrives(operations: list[tuple[int, int, bool]]) -> None:
    clock = Clock()
    records = ProviderRecords(clock, ttl=50.0, max_records=20, max_per_source=8)
    for n, source, removing in operations:
        host = f"10.0.0.{source}"
        if removing:
            records.remove(key(n), host)
        else:
            records.store(key(n), at(host))
        clock.advance(1)
        if n % 7 == 0:
            records.expire()
        held = [(k, p.host) for k in records for p in records.providers_of(k)]
        assert len(held) <= len(records) <= 20
        per_host: dict[str, int] = {}
        for _, h in held:
            per_host[h] = per_host.get(h, 0) + 1
        assert all(count <= 8 for count in per_host.values())
    clock.advance(100)
    records.expire()
    assert len(records) == 0 and list(records) == [] and records.sources() == 0
