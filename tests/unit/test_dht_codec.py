"""The DHT wire format: exact round trips, only DecodeError on bad bytes, datagrams that fit."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spegel_tx.routing.kademlia.codec import (
    BINDING_SIZE,
    HEADER_SIZE,
    MAX_KEYS_PER_DATAGRAM,
    SIGNED_TRAILER,
    TAG_SIZE,
    DecodeError,
    body_room,
    canonical_host,
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
    Binding,
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
        MessageType.NODES: st.builds(Nodes, contacts(hosts, 21)),
        MessageType.PROVIDERS: st.builds(Providers, providers(hosts, 11), contacts(hosts, 10)),
        MessageType.ADD_PROVIDER: st.builds(AddProvider, keys),
        MessageType.REMOVE_PROVIDER: st.builds(RemoveProvider, keys),
    }[kind]


all_bodies = st.one_of(*(bodies(kind, any_hosts) for kind in MessageType))
messages = st.builds(Message, headers, all_bodies)


def binding_of(hosts: st.SearchStrategy[str]) -> st.SearchStrategy[Binding]:
    """Bindings as decoding gives them back: an IPv4-mapped address comes back as IPv4."""
    return st.builds(Binding, ids, hosts.map(canonical_host), ports)


bindings = binding_of(any_hosts)
signed_messages = st.builds(Message, headers, all_bodies, bindings)


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
BINDING = Binding(b"\xbb" * ID_LENGTH, "10.0.0.1", 5001)


def signed(body: Body) -> Message:
    return Message(HEADER, body, BINDING)


# Round trips


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_every_message_type_round_trips(data):
    # One loop, not parametrize: pytest-twisted re-wraps a @given test once per parameter.
    for kind in MessageType:
        for hosts in (v4_hosts, v6_hosts):
            plain = Message(data.draw(headers), data.draw(bodies(kind, hosts)))
            binding = data.draw(binding_of(hosts))
            secret = data.draw(st.binary(max_size=64))
            for message, key in ((plain, None), (replace(plain, binding=binding), secret)):
                datagram = encode(message, key)
                assert len(datagram) <= MAX_DATAGRAM
                assert datagram[3] == kind
                assert decode(datagram, key) == message


@given(messages, bindings, secrets)
def test_mixed_families_round_trip(message, binding, secret):
    if secret is not None:
        message = replace(message, binding=binding)
    assert decode(encode(message, secret), secret) == message


@given(messages, bindings)
def test_the_trailer_is_the_binding_then_the_tag(message, binding):
    plain = encode(message)
    tagged = encode(replace(message, binding=binding), SECRET)
    assert tagged[: len(plain)] == plain
    trailer = tagged[len(plain) : -TAG_SIZE]
    assert trailer[:ID_LENGTH] == binding.receiver_id
    address = ipaddress.ip_address(binding.sender_host)
    if address.version == 4:
        address = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)
    assert trailer[ID_LENGTH:-2] == address.packed
    assert trailer[-2:] == binding.sender_port.to_bytes(2, "big")
    assert tagged[-TAG_SIZE:] == hmac.new(SECRET, tagged[:-TAG_SIZE], hashlib.sha256).digest()
    assert len(tagged) == len(plain) + BINDING_SIZE + TAG_SIZE == len(plain) + SIGNED_TRAILER


def test_a_signed_datagram_needs_its_binding():
    with pytest.raises(ValueError, match="binding"):
        encode(Message(HEADER, Ping()), SECRET)


@pytest.mark.parametrize(
    ("host", "canonical"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("fe80::1%eth0", "fe80::1"),
        ("2001:DB8::0001", "2001:db8::1"),
    ],
)
def test_a_binding_carries_the_canonical_address(host, canonical):
    assert canonical_host(host) == canonical
    message = Message(HEADER, Ping(), Binding(bytes(ID_LENGTH), host, 5001))
    binding = decode(encode(message, SECRET), SECRET).binding
    assert binding == Binding(bytes(ID_LENGTH), canonical, 5001)


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
    decodes_or_refuses(b"SX\x02" + bytes([kind]) + rest + body, None)


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
@given(signed_messages, st.data())
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
    datagram = encode(signed(body), SECRET)
    for position in range(len(datagram)):
        for flip in range(1, 256):
            mutated = bytearray(datagram)
            mutated[position] ^= flip
            assert reason(bytes(mutated), SECRET) == expected_reason(position), position


@given(signed_messages)
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
    assert reason(ping[:2] + b"\x01" + ping[3:]) == "version"
    assert reason(ping[:2] + b"\x03" + ping[3:]) == "version"
    assert reason(ping[:2] + b"\x00" + ping[3:]) == "version"
    assert reason(ping[:3] + b"\x00" + ping[4:]) == "type"
    assert reason(ping[:3] + b"\x0a" + ping[4:]) == "type"
    assert reason(ping + b"\x00") == "trailing"


def test_magic_version_and_type_are_reported_with_a_secret_too():
    ping = encode(signed(Ping()), SECRET)
    assert reason(b"XS" + ping[2:], SECRET) == "magic"
    assert reason(ping[:2] + b"\x01" + ping[3:], SECRET) == "version"
    # A correctly tagged datagram of an unknown type: the tag is fine, the type is not.
    body = ping[:3] + b"\xff" + ping[4:-TAG_SIZE]
    assert reason(body + hmac.new(SECRET, body, hashlib.sha256).digest(), SECRET) == "type"


def test_authentication_reasons():
    plain = encode(Message(HEADER, Ping()))
    tagged = encode(signed(Ping()), SECRET)
    assert reason(plain, SECRET) == "auth"  # no tag at all
    assert reason(tagged, b"another secret") == "auth"
    assert reason(tagged[:-1] + bytes([tagged[-1] ^ 1]), SECRET) == "auth"
    assert reason(tagged) == "trailing"  # a tag the receiver does not expect
    assert decode(tagged, SECRET) == signed(Ping())
    # A version 1 signed datagram (a tag, no binding) is refused as another version.
    old = plain[:2] + b"\x01" + plain[3:]
    assert reason(old + hmac.new(SECRET, old, hashlib.sha256).digest(), SECRET) == "version"


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
    encode(signed(AddProvider(keys[:-1])), SECRET)
    with pytest.raises(ValueError, match="exceeds"):
        encode(signed(AddProvider(keys)), SECRET)
    with pytest.raises(ValueError, match="exceeds"):
        encode(signed(Nodes(tuple(contact(i) for i in range(22)))), SECRET)


# Sizes


def test_sizes():
    assert HEADER_SIZE == 54
    assert BINDING_SIZE == 50
    assert TAG_SIZE == 32
    assert MAX_KEYS_PER_DATAGRAM == 34
    assert len(encode(signed(Ping()), SECRET)) == 136
    assert body_room(MAX_DATAGRAM, signed=True) == 1096
    assert body_room(MAX_DATAGRAM, signed=False) == 1178
    assert body_room(86, signed=False) == 32


def test_split_keys_batches_fill_authenticated_datagrams():
    keys = [i.to_bytes(ID_LENGTH, "big") for i in range(100)]
    batches = split_keys(keys)
    assert [len(batch) for batch in batches] == [34, 34, 32]
    assert [key for batch in batches for key in batch] == keys
    assert split_keys([]) == []
    for batch in batches:
        for body in (AddProvider(batch), RemoveProvider(batch)):
            assert len(encode(signed(body), SECRET)) <= MAX_DATAGRAM
    full = encode(signed(AddProvider(batches[0])), SECRET)
    assert len(full) == HEADER_SIZE + 1 + 34 * ID_LENGTH + SIGNED_TRAILER == 1225


@given(st.lists(ids, max_size=200))
def test_split_keys_always_fits(keys):
    batches = split_keys(keys)
    assert [key for batch in batches for key in batch] == keys
    for batch in batches:
        assert 0 < len(batch) <= MAX_KEYS_PER_DATAGRAM
        assert len(encode(signed(AddProvider(batch)), SECRET)) <= MAX_DATAGRAM


def test_k_20_ipv6_contacts_fit_with_a_tag():
    twenty = tuple(contact(i) for i in range(20))
    assert fit_contacts(twenty) == twenty
    datagram = encode(signed(Nodes(twenty)), SECRET)
    assert len(datagram) == HEADER_SIZE + 1 + 20 * V6_ENTRY + SIGNED_TRAILER == 1157


@pytest.mark.parametrize(("family", "entry"), [(4, 39), (6, 51)])
def test_a_contact_costs_39_bytes_over_ipv4_and_51_over_ipv6(family, entry):
    """So a signed datagram's 1096 bytes of body room (1232 - 54 - 50 - 32) hold 28 IPv4
    or 21 IPv6 contacts, after Nodes' 1-byte count or Providers' 2: the figures below."""
    empty = len(encode(signed(Nodes(())), SECRET))
    one = len(encode(signed(Nodes((contact(1, family),))), SECRET))
    assert one - empty == entry
    assert MAX_DATAGRAM - empty == 1096 - 1


@pytest.mark.parametrize(("family", "most"), [(4, 28), (6, 21)])
def test_the_largest_fitted_nodes_datagram(family, most):
    fitted = fit_contacts([contact(i, family) for i in range(40)])
    assert len(fitted) == most
    assert len(encode(signed(Nodes(fitted)), SECRET)) <= MAX_DATAGRAM
    with pytest.raises(ValueError):
        encode(signed(Nodes((*fitted, contact(99, family)))), SECRET)


@pytest.mark.parametrize(("family", "room", "most"), [(4, 32, 0), (4, 40, 1), (6, 400, 7)])
def test_contacts_fitted_to_a_smaller_room(family, room, most):
    fitted = fit_contacts([contact(i, family) for i in range(20)], room)
    assert len(fitted) == most
    assert len(encode(Message(HEADER, Nodes(fitted)))) <= HEADER_SIZE + room


@pytest.mark.parametrize(("family", "most"), [(4, 28), (6, 21)])
def test_the_largest_fitted_providers_datagram(family, most):
    fitted_providers, fitted_closer = fit_providers(
        [provider(i, family) for i in range(15)], [contact(i, family) for i in range(20)]
    )
    assert len(fitted_providers) == 15  # providers first,
    assert len(fitted_closer) == most - 15  # closer contacts give way
    datagram = encode(signed(Providers(fitted_providers, fitted_closer)), SECRET)
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
    message = signed(Providers(fitted_providers, fitted_closer))
    assert len(encode(message, SECRET)) <= MAX_DATAGRAM
    if len(fitted_providers) < len(all_providers):
        assert fitted_closer == ()
        bigger = Providers((*fitted_providers, all_providers[len(fitted_providers)]))
        with pytest.raises(ValueError):
            encode(signed(bigger), SECRET)
    if len(fitted_closer) < len(all_closer):
        bigger = Providers(fitted_providers, (*fitted_closer, all_closer[len(fitted_closer)]))
        with pytest.raises(ValueError):
            encode(signed(bigger), SECRET)


@given(st.lists(st.builds(Contact, ids, any_hosts, ports), max_size=40))
def test_fitted_contacts_are_the_longest_prefix_that_fits(all_contacts):
    fitted = fit_contacts(all_contacts)
    assert list(fitted) == all_contacts[: len(fitted)]
    assert len(encode(signed(Nodes(fitted)), SECRET)) <= MAX_DATAGRAM
    if len(fitted) < len(all_contacts):
        with pytest.raises(ValueError):
            encode(signed(Nodes((*fitted, all_contacts[len(fitted)]))), SECRET)


# Golden vectors: the format cannot drift silently

GOLDEN_HEADER = (
    "5358"  # magic "SX"
    "02"  # version
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
    trailer = (
        "bb" * 32  # receiver id
        + "00000000000000000000ffff0a000001"  # sender 10.0.0.1, IPv4-mapped
        + "1389"  # sender's router port 5001
    )
    # HMAC-SHA256 with key b"k" over the 104 bytes above (hmac.new(...).hexdigest()).
    tag = "75a4870f57375eb05746570ae792311ebeeedc6400dbc32835b6d7c7f10af50d"
    expected = golden(MessageType.PING, trailer + tag)
    assert len(expected) == 136
    assert encode(signed(Ping()), b"k") == expected
    assert decode(expected, b"k") == signed(Ping())


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
