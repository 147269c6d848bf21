"""The DHT wire format: exact round trips, only DecodeError on bad bytes, datagrams that fit."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spegel_tx.routing.kademlia.codec import (
    HEADER_SIZE,
    MAX_KEYS_PER_DATAGRAM,
    TAG_SIZE,
    DecodeError,
    decode,
    encode,
    fit_contacts,
    fit_providers,
    split_keys,
)
from spegel_tx.routing.kademlia.messages import (
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

SECRET = b"cluster secret"
V6_ENTRY = ID_LENGTH + 1 + 16 + 2

# Strategies

ids = st.binary(min_size=ID_LENGTH, max_size=ID_LENGTH)
ports = st.integers(0, 65535)
v4_hosts = st.ip_addresses(v=4).map(str)
v6_hosts = st.ip_addresses(v=6).map(str)
any_hosts = v4_hosts | v6_hosts
secrets = st.none() | st.binary(max_size=64)
headers = st.builds(
    Header,
    txid=st.binary(min_size=8, max_size=8),
    sender_id=ids,
    registry_port=ports,
    timestamp_ms=st.integers(0, 2**64 - 1),
)


def contacts(hosts: st.SearchStrategy[str], max_size: int) -> st.SearchStrategy[tuple]:
    return st.lists(st.builds(Contact, ids, hosts, ports), max_size=max_size).map(tuple)


def providers(hosts: st.SearchStrategy[str], max_size: int) -> st.SearchStrategy[tuple]:
    return st.lists(st.builds(Provider, ids, hosts, ports), max_size=max_size).map(tuple)


def bodies(kind: MessageType, hosts: st.SearchStrategy[str]) -> st.SearchStrategy[Body]:
    """Bodies of one type that fit an authenticated datagram even when all hosts are IPv6."""
    keys = st.lists(ids, max_size=MAX_KEYS_PER_DATAGRAM).map(tuple)
    return {
        MessageType.PING: st.just(Ping()),
        MessageType.PONG: st.just(Pong()),
        MessageType.ACK: st.just(Ack()),
        MessageType.FIND_NODE: st.builds(FindNode, ids),
        MessageType.GET_PROVIDERS: st.builds(GetProviders, ids),
        MessageType.NODES: st.builds(Nodes, contacts(hosts, 22)),
        MessageType.PROVIDERS: st.builds(Providers, providers(hosts, 11), contacts(hosts, 11)),
        MessageType.ADD_PROVIDER: st.builds(AddProvider, keys),
        MessageType.REMOVE_PROVIDER: st.builds(RemoveProvider, keys),
    }[kind]


all_bodies = st.one_of(*(bodies(kind, any_hosts) for kind in MessageType))
messages = st.builds(Message, headers, all_bodies)


def reason(data: bytes, secret: bytes | None = None) -> str:
    with pytest.raises(DecodeError) as caught:
        decode(data, secret)
    return caught.value.reason


def contact(index: int, family: int = 6) -> Contact:
    host = f"2001:db8::{index:x}" if family == 6 else f"10.0.{index // 256}.{index % 256}"
    return Contact(bytes([index % 256]) * ID_LENGTH, host, 5001)


def provider(index: int, family: int = 6) -> Provider:
    host = f"2001:db8::{index:x}" if family == 6 else f"10.0.{index // 256}.{index % 256}"
    return Provider(bytes([index % 256]) * ID_LENGTH, host, 5000)


HEADER = Header(b"\x00\x01\x02\x03\x04\x05\x06\x07", b"\xaa" * ID_LENGTH, 5000, 1_700_000_000_000)

# Round trips


@settings(max_examples=50)
@given(data=st.data())
def test_every_message_type_round_trips(data):
    # One loop, not parametrize: pytest-twisted re-wraps a @given test once per parameter.
    for kind in MessageType:
        for hosts in (v4_hosts, v6_hosts):
            message = Message(data.draw(headers), data.draw(bodies(kind, hosts)))
            for secret in (None, data.draw(st.binary(max_size=64))):
                datagram = encode(message, secret)
                assert len(datagram) <= MAX_DATAGRAM
                assert datagram[3] == kind
                assert decode(datagram, secret) == message


@given(messages, secrets)
def test_mixed_families_round_trip(message, secret):
    assert decode(encode(message, secret), secret) == message


@given(messages)
def test_the_tag_is_exactly_the_last_32_bytes(message):
    plain = encode(message)
    tagged = encode(message, SECRET)
    assert tagged == plain + hmac.new(SECRET, plain, hashlib.sha256).digest()
    assert len(tagged) == len(plain) + TAG_SIZE


def test_a_scoped_ipv6_host_travels_without_its_zone():
    message = Message(HEADER, Nodes((Contact(b"\x01" * ID_LENGTH, "fe80::1%eth0", 5001),)))
    decoded = decode(encode(message))
    assert isinstance(decoded.body, Nodes)
    assert decoded.body.contacts[0].host == "fe80::1"


# Whatever the bytes: only DecodeError


def decodes_or_refuses(data: bytes, secret: bytes | None) -> Message | None:
    try:
        return decode(data, secret)
    except DecodeError as e:
        assert e.reason in {
            "short",
            "magic",
            "version",
            "type",
            "truncated",
            "trailing",
            "oversize",
            "address",
            "auth",
            "count",
        }
        return None


@settings(max_examples=500)
@given(st.binary(max_size=MAX_DATAGRAM + 100), st.none() | st.just(SECRET))
def test_arbitrary_bytes_raise_only_decode_error(data, secret):
    decodes_or_refuses(data, secret)


@settings(max_examples=500)
@given(
    st.sampled_from(range(256)),
    st.binary(min_size=HEADER_SIZE - 4, max_size=HEADER_SIZE - 4),
    st.binary(max_size=MAX_DATAGRAM - HEADER_SIZE),
)
def test_arbitrary_bodies_behind_a_valid_header_raise_only_decode_error(kind, rest, body):
    # Past the magic and version, so the body parsers see the random bytes.
    decodes_or_refuses(b"SX\x01" + bytes([kind]) + rest + body, None)


@settings(max_examples=300)
@given(messages, st.data())
def test_mutated_plain_datagrams_raise_only_decode_error(message, data):
    datagram = bytearray(encode(message))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(datagram) - 1))
        datagram[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(datagram)))
    decodes_or_refuses(bytes(datagram[:cut]), None)


def expected_reason(position: int) -> str:
    """What a changed byte in an authenticated datagram is reported as."""
    if position < 2:
        return "magic"
    if position == 2:
        return "version"
    return "auth"


@settings(max_examples=200)
@given(messages, st.data())
def test_a_mutated_authenticated_datagram_never_decodes(message, data):
    datagram = encode(message, SECRET)
    position = data.draw(st.integers(0, len(datagram) - 1))
    flip = data.draw(st.integers(1, 255))
    mutated = bytearray(datagram)
    mutated[position] ^= flip
    assert reason(bytes(mutated), SECRET) == expected_reason(position)


@pytest.mark.parametrize(
    "body",
    [
        Ping(),
        Providers(
            (provider(1, 4), provider(2, 6)),
            (contact(3, 4), contact(4, 6)),
        ),
    ],
    ids=["ping", "providers"],
)
def test_every_single_byte_change_of_an_authenticated_datagram_is_refused(body):
    datagram = encode(Message(HEADER, body), SECRET)
    for position in range(len(datagram)):
        for flip in range(1, 256):
            mutated = bytearray(datagram)
            mutated[position] ^= flip
            assert reason(bytes(mutated), SECRET) == expected_reason(position), position


@given(messages)
def test_every_truncation_or_extension_of_an_authenticated_datagram_is_refused(message):
    datagram = encode(message, SECRET)
    for cut in range(len(datagram)):
        assert reason(datagram[:cut], SECRET) == ("short" if cut < HEADER_SIZE else "auth")
    if len(datagram) < MAX_DATAGRAM:
        assert reason(datagram + b"\x00", SECRET) == "auth"


@given(messages)
def test_every_truncation_of_a_plain_datagram_is_refused(message):
    datagram = encode(message)
    for cut in range(len(datagram)):
        expected = {"short"} if cut < HEADER_SIZE else {"truncated", "count"}
        assert reason(datagram[:cut]) in expected


# Reasons


def test_reasons():
    ping = encode(Message(HEADER, Ping()))
    assert reason(b"") == "short"
    assert reason(ping[: HEADER_SIZE - 1]) == "short"
    assert reason(ping + bytes(MAX_DATAGRAM)) == "oversize"
    assert reason(b"XS" + ping[2:]) == "magic"
    assert reason(ping[:2] + b"\x02" + ping[3:]) == "version"
    assert reason(ping[:2] + b"\x00" + ping[3:]) == "version"
    assert reason(ping[:3] + b"\x00" + ping[4:]) == "type"
    assert reason(ping[:3] + b"\x0a" + ping[4:]) == "type"
    assert reason(ping + b"\x00") == "trailing"


def test_magic_version_and_type_are_reported_with_a_secret_too():
    ping = encode(Message(HEADER, Ping()), SECRET)
    assert reason(b"XS" + ping[2:], SECRET) == "magic"
    assert reason(ping[:2] + b"\x02" + ping[3:], SECRET) == "version"
    # A correctly tagged datagram of an unknown type: the tag is fine, the type is not.
    body = ping[:3] + b"\xff" + ping[4:-TAG_SIZE]
    assert reason(body + hmac.new(SECRET, body, hashlib.sha256).digest(), SECRET) == "type"


def test_authentication_reasons():
    plain = encode(Message(HEADER, Ping()))
    tagged = encode(Message(HEADER, Ping()), SECRET)
    assert reason(plain, SECRET) == "auth"  # no tag at all
    assert reason(tagged, b"another secret") == "auth"
    assert reason(tagged[:-1] + bytes([tagged[-1] ^ 1]), SECRET) == "auth"
    assert reason(tagged) == "trailing"  # a tag the receiver does not expect
    assert decode(tagged, SECRET) == Message(HEADER, Ping())


def test_body_reasons():
    start = encode(Message(HEADER, Ping()))[:HEADER_SIZE]

    def with_type(kind: MessageType) -> bytes:
        return start[:3] + bytes([kind]) + start[4:]

    assert reason(with_type(MessageType.FIND_NODE) + b"\x01" * 31) == "truncated"
    assert reason(with_type(MessageType.FIND_NODE) + b"\x01" * 33) == "trailing"
    assert reason(with_type(MessageType.NODES)) == "truncated"  # no count
    assert reason(with_type(MessageType.NODES) + b"\x00\x00") == "trailing"
    # One IPv6 entry promised, room for a single IPv4-sized one only.
    entry = b"\x01" * ID_LENGTH + b"\x06" + b"\x00" * 6
    assert reason(with_type(MessageType.NODES) + b"\x01" + entry) == "truncated"
    bad_family = b"\x01" * ID_LENGTH + b"\x05" + b"\x00" * 6
    assert reason(with_type(MessageType.NODES) + b"\x01" + bad_family) == "address"
    assert reason(with_type(MessageType.NODES) + b"\xff" + bad_family) == "count"
    assert reason(with_type(MessageType.ADD_PROVIDER) + b"\x02" + b"\x01" * 32) == "count"
    assert reason(with_type(MessageType.REMOVE_PROVIDER) + b"\x01" + b"\x01" * 33) == "trailing"
    # Providers with a good provider list but no closer count.
    one = b"\x01" + b"\x01" * ID_LENGTH + b"\x04" + b"\x0a\x00\x00\x01" + b"\x13\x88"
    assert reason(with_type(MessageType.PROVIDERS) + one) == "truncated"


# Encoding refuses what it cannot say exactly


@pytest.mark.parametrize(
    "message",
    [
        Message(Header(b"short", b"\x00" * ID_LENGTH, 5000, 0), Ping()),
        Message(Header(b"\x00" * 8, b"\x00" * 31, 5000, 0), Ping()),
        Message(Header(b"\x00" * 8, b"\x00" * ID_LENGTH, 65536, 0), Ping()),
        Message(Header(b"\x00" * 8, b"\x00" * ID_LENGTH, -1, 0), Ping()),
        Message(Header(b"\x00" * 8, b"\x00" * ID_LENGTH, 5000, -1), Ping()),
        Message(Header(b"\x00" * 8, b"\x00" * ID_LENGTH, 5000, 2**64), Ping()),
        Message(HEADER, FindNode(b"\x00" * 33)),
        Message(HEADER, GetProviders(b"")),
        Message(HEADER, AddProvider((b"\x00" * 31,))),
        Message(HEADER, Nodes((Contact(b"\x00" * ID_LENGTH, "node-1.cluster.local", 5001),))),
        Message(HEADER, Nodes((Contact(b"\x00" * ID_LENGTH, "10.0.0.1", 70000),))),
        Message(HEADER, Nodes((Contact(b"\x00" * 8, "10.0.0.1", 5001),))),
        Message(HEADER, Providers((Provider(b"\x00" * ID_LENGTH, "", 5000),))),
        Message(HEADER, AddProvider((b"\x00" * ID_LENGTH,) * 256)),
    ],
    ids=lambda message: type(message.body).__name__,
)
def test_encode_refuses_fields_it_cannot_carry(message):
    with pytest.raises(ValueError):
        encode(message)


def test_encode_refuses_datagrams_over_the_limit():
    keys = tuple(bytes([i]) * ID_LENGTH for i in range(MAX_KEYS_PER_DATAGRAM + 1))
    encode(Message(HEADER, AddProvider(keys[:-1])), SECRET)
    with pytest.raises(ValueError, match="exceeds"):
        encode(Message(HEADER, AddProvider(keys)), SECRET)
    with pytest.raises(ValueError, match="exceeds"):
        encode(Message(HEADER, Nodes(tuple(contact(i) for i in range(23)))), SECRET)


# Sizes


def test_sizes():
    assert HEADER_SIZE == 54
    assert TAG_SIZE == 32
    assert MAX_KEYS_PER_DATAGRAM == 35
    assert len(encode(Message(HEADER, Ping()), SECRET)) == 86


def test_split_keys_batches_fill_authenticated_datagrams():
    keys = [i.to_bytes(ID_LENGTH, "big") for i in range(100)]
    batches = split_keys(keys)
    assert [len(batch) for batch in batches] == [35, 35, 30]
    assert [key for batch in batches for key in batch] == keys
    assert split_keys([]) == []
    for batch in batches:
        for body in (AddProvider(batch), RemoveProvider(batch)):
            assert len(encode(Message(HEADER, body), SECRET)) <= MAX_DATAGRAM
    full = encode(Message(HEADER, AddProvider(batches[0])), SECRET)
    assert len(full) == HEADER_SIZE + 1 + 35 * ID_LENGTH + TAG_SIZE == 1207


@given(st.lists(ids, max_size=200))
def test_split_keys_always_fits(keys):
    batches = split_keys(keys)
    assert [key for batch in batches for key in batch] == keys
    for batch in batches:
        assert 0 < len(batch) <= MAX_KEYS_PER_DATAGRAM
        assert len(encode(Message(HEADER, AddProvider(batch)), SECRET)) <= MAX_DATAGRAM


def test_k_20_ipv6_contacts_fit_with_a_tag():
    twenty = tuple(contact(i) for i in range(20))
    assert fit_contacts(twenty) == twenty
    datagram = encode(Message(HEADER, Nodes(twenty)), SECRET)
    assert len(datagram) == HEADER_SIZE + 1 + 20 * V6_ENTRY + TAG_SIZE == 1107


def test_entry_arithmetic():
    # Body room with a tag: 1232 - 54 - 32 = 1146 bytes; Nodes spends 1 on its count,
    # Providers 2. IPv4 entries are 39 bytes, IPv6 ones 51.
    assert (1146 - 1) // 39 == (1146 - 2) // 39 == 29
    assert (1146 - 1) // 51 == (1146 - 2) // 51 == 22


@pytest.mark.parametrize(("family", "most"), [(4, 29), (6, 22)])
def test_the_largest_fitted_nodes_datagram(family, most):
    fitted = fit_contacts([contact(i, family) for i in range(40)])
    assert len(fitted) == most
    assert len(encode(Message(HEADER, Nodes(fitted)), SECRET)) <= MAX_DATAGRAM
    with pytest.raises(ValueError):
        encode(Message(HEADER, Nodes((*fitted, contact(99, family)))), SECRET)


@pytest.mark.parametrize(("family", "most"), [(4, 29), (6, 22)])
def test_the_largest_fitted_providers_datagram(family, most):
    fitted_providers, fitted_closer = fit_providers(
        [provider(i, family) for i in range(15)], [contact(i, family) for i in range(20)]
    )
    assert len(fitted_providers) == 15  # providers first,
    assert len(fitted_closer) == most - 15  # closer contacts give way
    datagram = encode(Message(HEADER, Providers(fitted_providers, fitted_closer)), SECRET)
    assert len(datagram) <= MAX_DATAGRAM
    only_providers, no_closer = fit_providers([provider(i, family) for i in range(40)], [])
    assert (len(only_providers), no_closer) == (most, ())


@given(
    st.lists(st.builds(Provider, ids, any_hosts, ports), max_size=40),
    st.lists(st.builds(Contact, ids, any_hosts, ports), max_size=40),
)
def test_fitted_providers_are_the_longest_prefixes_that_fit(all_providers, all_closer):
    fitted_providers, fitted_closer = fit_providers(all_providers, all_closer)
    assert list(fitted_providers) == all_providers[: len(fitted_providers)]
    assert list(fitted_closer) == all_closer[: len(fitted_closer)]
    message = Message(HEADER, Providers(fitted_providers, fitted_closer))
    assert len(encode(message, SECRET)) <= MAX_DATAGRAM
    if len(fitted_providers) < len(all_providers):
        assert fitted_closer == ()
        bigger = Providers((*fitted_providers, all_providers[len(fitted_providers)]))
        with pytest.raises(ValueError):
            encode(Message(HEADER, bigger), SECRET)
    if len(fitted_closer) < len(all_closer):
        bigger = Providers(fitted_providers, (*fitted_closer, all_closer[len(fitted_closer)]))
        with pytest.raises(ValueError):
            encode(Message(HEADER, bigger), SECRET)


@given(st.lists(st.builds(Contact, ids, any_hosts, ports), max_size=40))
def test_fitted_contacts_are_the_longest_prefix_that_fits(all_contacts):
    fitted = fit_contacts(all_contacts)
    assert list(fitted) == all_contacts[: len(fitted)]
    assert len(encode(Message(HEADER, Nodes(fitted)), SECRET)) <= MAX_DATAGRAM
    if len(fitted) < len(all_contacts):
        with pytest.raises(ValueError):
            encode(Message(HEADER, Nodes((*fitted, all_contacts[len(fitted)]))), SECRET)


# Golden vectors: the format cannot drift silently

GOLDEN_HEADER = (
    "5358"  # magic "SX"
    "01"  # version
    "{type}"
    "0001020304050607"  # txid
    + "aa"
    * 32  # sender id
    + "1388"  # registry port 5000
    "0000018bcfe56800"  # 1,700,000,000,000 ms
)


def golden(kind: MessageType, body: str) -> bytes:
    return bytes.fromhex(GOLDEN_HEADER.format(type=f"{kind:02x}") + body)


def test_golden_ping():
    expected = golden(MessageType.PING, "")
    assert len(expected) == 54
    assert encode(Message(HEADER, Ping())) == expected
    assert decode(expected) == Message(HEADER, Ping())


def test_golden_authenticated_ping():
    # HMAC-SHA256 with key b"k" over the 54 bytes above (hmac.new(...).hexdigest()).
    tag = "4a1603df3fd66c3de210a6e08fe414e6b2814fd7a1451c5cc696935b065ed861"
    expected = golden(MessageType.PING, tag)
    assert encode(Message(HEADER, Ping()), b"k") == expected
    assert decode(expected, b"k") == Message(HEADER, Ping())


def test_golden_providers():
    body = (
        "01"  # one provider
        + "01" * 32
        + "04"
        + "0a000001"  # 10.0.0.1
        + "1388"  # registry port 5000
        + "01"  # one closer contact
        + "02" * 32
        + "06"
        + "20010db8000000000000000000000001"  # 2001:db8::1
        + "1389"  # router port 5001
    )
    message = Message(
        HEADER,
        Providers(
            (Provider(b"\x01" * 32, "10.0.0.1", 5000),),
            (Contact(b"\x02" * 32, "2001:db8::1", 5001),),
        ),
    )
    assert encode(message) == golden(MessageType.PROVIDERS, body)
    assert decode(golden(MessageType.PROVIDERS, body)) == message


def test_golden_add_provider_and_find_node():
    keys = (b"\x03" * 32, b"\x04" * 32)
    add = golden(MessageType.ADD_PROVIDER, "02" + "03" * 32 + "04" * 32)
    assert encode(Message(HEADER, AddProvider(keys))) == add
    find = golden(MessageType.FIND_NODE, "05" * 32)
    assert encode(Message(HEADER, FindNode(b"\x05" * 32))) == find
    assert golden(MessageType.ACK, "")[3] == 9
