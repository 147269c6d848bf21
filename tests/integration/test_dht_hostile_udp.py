"""A stranger on the DHT against real ``twistd -n spegel`` nodes over loopback UDP.

Three nodes share the session's containerd (each advertises the demo image); a
stranger the test controls (``tests/support/hostile.py``) sits at another loopback
address and forges ids, takes a live node's id, crowds a key, floods, asks for large
answers and replays signed datagrams it captured. Everything is read as an operator
would: ``/debug/peers`` (routing table, records, drop counters) and ``/debug/lookup``
on each node's metrics address, and the node's RSS in ``/proc``.

Addresses are drawn at random in 127.64-250.x.x and ports are free ones, so another
copy of the suite can run beside this one. Every load loop is bounded in count and
time. Figures (RSS before and after a flood, bytes in and out) are printed; run with
``-s`` to see them.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from spegel_tx.routing.kademlia.messages import AddProvider, FindNode, GetProviders, Ping
from spegel_tx.routing.kademlia.node import key_id
from tests.support.hostile import LoopbackCapture, Stranger, UDPStranger, ids_near, request
from tests.support.loopback import loopback_host
from tests.support.processes import poll, rss

pytestmark = pytest.mark.integration

SECRET = "hostile-test-cluster-secret-0123456789"


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def debug_peers(node: Any) -> dict[str, Any]:
    return get_json(f"{node.metrics_url}/debug/peers")


def lookup(node: Any, key: str) -> set[str]:
    quoted = urllib.parse.quote(key)
    page = get_json(f"{node.metrics_url}/debug/lookup?key={quoted}")
    return {f"{p['host']}:{p['registry_port']}" for p in page["providers"]}


def contacts_at(node: Any, host: str) -> list[dict[str, Any]]:
    return [peer for peer in debug_peers(node)["peers"] if peer["host"] == host]


def counter(node: Any, name: str) -> int:
    return int(debug_peers(node)["counters"].get(name, 0))


def router(node: Any) -> tuple[str, int]:
    host, port = node.router_address.rsplit(":", 1)
    return host, int(port)


def rss_mib(node: Any) -> float:
    return rss(node.pid) / (1 << 20)


@pytest.fixture
def cluster(spegel_node: Callable[..., Any], containerd: Any) -> Callable[..., list[Any]]:
    """``cluster(count, **keys)``: nodes at fresh loopback addresses, bootstrapping from the
    first, returned once each knows every other."""

    def start(count: int = 3, hosts: list[str] | None = None, **keys: Any) -> list[Any]:
        hosts = hosts or [loopback_host() for _ in range(count)]
        first = spegel_node(containerd, host=hosts[0], wait_ready=False, **keys)
        nodes = [first] + [
            spegel_node(
                containerd,
                host=host,
                wait_ready=False,
                static_bootstrap_peers=first.router_address,
                **keys,
            )
            for host in hosts[1:]
        ]
        for node in nodes:
            others = {n.router_address for n in nodes if n is not node}

            def knows_all(node: Any = node, others: set[str] = others) -> bool:
                peers = debug_peers(node)["peers"]
                return others <= {f"{p['host']}:{p['port']}" for p in peers}

            assert poll(knows_all, 30), f"{node.router_address} does not know {others}"
        return nodes

    return start


@pytest.fixture
def stranger_at() -> Iterator[Callable[[Stranger], UDPStranger]]:
    with ExitStack() as stack:

        def start(stranger: Stranger) -> UDPStranger:
            return stack.enter_context(UDPStranger(stranger, loopback_host()))

        yield start


def send_paced(
    stranger: UDPStranger,
    datagrams: Iterator[tuple[bytes, tuple[str, int]]],
    per_second: float,
    limit: float = 60.0,
) -> int:
    """Send at about ``per_second``, for at most ``limit`` seconds; how many went."""
    started = time.monotonic()
    sent = 0
    for datagram, address in datagrams:
        if time.monotonic() - started > limit:
            break
        stranger.send(datagram, address)
        sent += 1
        if sent % 100 == 0:
            ahead = sent / per_second - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    return sent


def test_a_live_nodes_id_cannot_be_taken_over_from_another_address(
    cluster: Callable[..., list[Any]],
    stranger_at: Callable[[Stranger], UDPStranger],
    demo_image: Any,
) -> None:
    a, b, c = cluster(3)
    a_id = bytes.fromhex(debug_peers(a)["node_id"])
    stranger = stranger_at(Stranger([a_id]))
    key = demo_image.layer_digests[0]
    claims = [
        (request(body, a_id), router(node))
        for _ in range(100)
        for node in (b, c)
        for body in (Ping(), FindNode(os.urandom(32)), AddProvider((key_id(key),)))
    ]
    send_paced(stranger, iter(claims), per_second=100)
    time.sleep(1)

    for node in (b, c):
        held = {p["node_id"]: f"{p['host']}:{p['port']}" for p in debug_peers(node)["peers"]}
        assert held[a_id.hex()] == a.router_address, "A's id stays at A's address"
        assert contacts_at(node, stranger.host) == []
        assert counter(node, "dropped_id_conflict") > 0
        other = c if node is b else b
        assert lookup(node, key) >= {a.address, other.address}
    print(
        f"\nid takeover: {len(claims)} claims of A's id from {stranger.host}; "
        f"B and C hold A at {a.router_address}; dropped_id_conflict "
        f"B={counter(b, 'dropped_id_conflict')} C={counter(c, 'dropped_id_conflict')}"
    )


@pytest.mark.parametrize("forged", [60, 120])
def test_forged_ids_near_a_key_neither_hide_it_nor_take_its_records(
    forged: int,
    cluster: Callable[..., list[Any]],
    stranger_at: Callable[[Stranger], UDPStranger],
    demo_image: Any,
) -> None:
    # Records live 12 s and are republished every 5 s: within the test, every record on
    # the nodes has been placed again while the stranger's ids were in their tables.
    nodes = cluster(3, router_record_ttl="12s", router_republish_interval="5s")
    key = demo_image.layer_digests[0]
    stranger = stranger_at(Stranger(ids_near(key_id(key), forged)))
    claims = [
        (datagram, router(node))
        for node in nodes
        for datagram in stranger.stranger.claims(FindNode(key_id(key)))
    ]
    send_paced(stranger, iter(claims), per_second=200)
    time.sleep(15)

    for node in nodes:
        assert len(contacts_at(node, stranger.host)) <= 2
        others = {n.address for n in nodes if n is not node}
        assert lookup(node, key) == others, "every real provider is found"
    offered = len(stranger.stranger.keys_offered)
    stored = [debug_peers(node)["records_stored"] for node in nodes]
    print(
        f"\neclipse with {forged} forged ids near {key[:19]}...: contacts at the stranger "
        f"{[len(contacts_at(n, stranger.host)) for n in nodes]}, lookups found every "
        f"provider, records on the nodes {stored}, keys placed on the stranger {offered}, "
        f"dropped_host_full {[counter(n, 'dropped_host_full') for n in nodes]}"
    )


@pytest.mark.parametrize("same_keys", [False, True], ids=["new-keys", "same-keys"])
def test_an_add_provider_flood_is_bounded_and_memory_stays_flat(
    same_keys: bool,
    cluster: Callable[..., list[Any]],
    stranger_at: Callable[[Stranger], UDPStranger],
    demo_image: Any,
) -> None:
    a, b = cluster(2)
    stranger = stranger_at(Stranger([os.urandom(32)]))
    rng = random.Random(17)
    fixed = tuple(rng.randbytes(32) for _ in range(34))

    def flood() -> Iterator[tuple[bytes, tuple[str, int]]]:
        for _ in range(50_000):  # a new sender id every time, 34 keys each
            keys = fixed if same_keys else tuple(rng.randbytes(32) for _ in range(34))
            yield request(AddProvider(keys), os.urandom(32)), router(b)

    advertised = 1 + len(demo_image.digests)  # A's tag and digests, stored on B
    assert poll(lambda: debug_peers(b)["records_stored"] == advertised, 10)
    before = rss_mib(b)
    records_before = debug_peers(b)["records_stored"]
    received_before = counter(b, "datagrams_in")
    started = time.monotonic()
    sent = send_paced(stranger, flood(), per_second=5_000)
    seconds = time.monotonic() - started
    time.sleep(2)
    after = rss_mib(b)
    page = debug_peers(b)
    received = page["counters"]["datagrams_in"] - received_before

    assert sent == 50_000
    limit = 34 if same_keys else 25_000
    assert page["records_stored"] - records_before <= limit
    assert page["records_stored"] - records_before == min(limit, 34 * received)
    assert lookup(b, demo_image.layer_digests[0]) == {a.address}, "it still serves lookups"
    print(
        f"\nAddProvider flood ({'same 34 keys' if same_keys else 'new keys'}, new id each): "
        f"{sent} sent in {seconds:.1f} s, {received} received; records "
        f"{records_before} -> {page['records_stored']}; RSS {before:.1f} -> {after:.1f} MiB"
    )


def test_answers_to_one_address_are_no_amplifier(
    cluster: Callable[..., list[Any]],
    stranger_at: Callable[[Stranger], UDPStranger],
) -> None:
    (node,) = cluster(1)
    # Twenty peers that answer pings, each at its own address: a full table to answer from.
    for _ in range(20):
        peer = stranger_at(Stranger([os.urandom(32)]))
        peer.send(request(Ping(), peer.stranger.ids[0]), router(node))
    assert poll(lambda: len(debug_peers(node)["peers"]) >= 20, 10)
    stranger = stranger_at(Stranger([os.urandom(32)]))
    asks = [
        (request(body, stranger.stranger.ids[0]), router(node))
        for _ in range(2500)
        for body in (FindNode(os.urandom(32)), GetProviders(os.urandom(32)))
    ]
    started = time.monotonic()
    send_paced(stranger, iter(asks), per_second=2_500)
    time.sleep(1)
    seconds = time.monotonic() - started
    sent = sum(len(datagram) for datagram, _ in asks)
    answered = stranger.stranger.bytes_in
    allowance = 128 * 1024 + 16 * 1024 * seconds
    print(
        f"\nFindNode+GetProviders from one address: {sent} bytes asked, {answered} bytes "
        f"answered in {seconds:.1f} s ({answered / sent:.2f}x), "
        f"answers_trimmed {counter(node, 'answers_trimmed')}"
    )
    assert stranger.stranger.received["Nodes"] + stranger.stranger.received["Providers"] > 4900
    assert answered - sent <= allowance


def test_signed_datagrams_replayed_to_another_node_or_from_another_address_are_dropped(
    cluster: Callable[..., list[Any]],
    stranger_at: Callable[[Stranger], UDPStranger],
    demo_image: Any,
    tmp_path: Path,
) -> None:
    secret = tmp_path / "router-secret"
    secret.write_text(SECRET)
    hosts = [loopback_host() for _ in range(3)]
    try:
        capture = LoopbackCapture(hosts)
    except PermissionError:
        pytest.skip("capturing loopback datagrams needs CAP_NET_RAW")
    with capture:
        a, b, c = cluster(3, hosts=hosts, router_secret_file=str(secret))
        key = demo_image.layer_digests[0]
        assert poll(lambda: lookup(b, key) == {a.address, c.address}, 10)
    a_to_b = [
        payload
        for source, destination, payload in capture.datagrams
        if source == router(a) and destination == router(b) and payload[:2] == b"SX"
    ]
    assert a_to_b, "A talked to B"
    stranger = stranger_at(Stranger([os.urandom(32)]))
    drops_c = counter(c, "dropped_wrong_receiver") + counter(c, "dropped_wrong_source")
    drops_b = counter(b, "dropped_wrong_source")
    for payload in a_to_b:
        stranger.send(payload, router(c))  # to another node
        stranger.send(payload, router(b))  # to B, but from the stranger's address
    time.sleep(1)

    replayed_c = counter(c, "dropped_wrong_receiver") + counter(c, "dropped_wrong_source") - drops_c
    replayed_b = counter(b, "dropped_wrong_source") - drops_b
    assert replayed_c == len(a_to_b)
    assert replayed_b == len(a_to_b)
    for node in (b, c):
        assert contacts_at(node, stranger.host) == []
        assert all(stranger.host not in p for p in lookup(node, key))
    print(
        f"\nsigned replays: {len(a_to_b)} datagrams A sent B, captured on lo and replayed "
        f"from {stranger.host} to C and to B: C dropped {replayed_c} "
        f"(wrong_receiver {counter(c, 'dropped_wrong_receiver')}, wrong_source "
        f"{counter(c, 'dropped_wrong_source')}), B dropped {replayed_b} as wrong_source"
    )
