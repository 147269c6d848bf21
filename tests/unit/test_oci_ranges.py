import pytest
from hypothesis import given
from hypothesis import strategies as st

from spegel_tx.oci.ranges import ByteRange, RangeNotSatisfiable, content_range, parse_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, ByteRange(0, 9)),
        ("bytes=90-", 100, ByteRange(90, 99)),
        ("bytes=90-500", 100, ByteRange(90, 99)),
        ("bytes=-10", 100, ByteRange(90, 99)),
        ("bytes=-500", 100, ByteRange(0, 99)),
        ("bytes=14680064-", 20000000, ByteRange(14680064, 19999999)),
    ],
)
def test_single_ranges(header, size, expected):
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    "header", [None, "bytes=5-1", "items=0-1", "bytes=0-1,5-6", "bytes=-", "junk"]
)
def test_ranges_that_are_ignored(header):
    assert parse_range(header, 100) is None


@pytest.mark.parametrize(
    ("header", "size"), [("bytes=100-", 100), ("bytes=-0", 100), ("bytes=0-", 0)]
)
def test_unsatisfiable(header, size):
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


def test_content_range_text():
    assert ByteRange(10, 19).content_range(100) == "bytes 10-19/100"
    assert ByteRange(10, 19).length == 10


@given(size=st.integers(1, 10**12), first=st.integers(0, 10**12), span=st.integers(0, 10**12))
def test_any_satisfiable_range_lies_inside_the_content(size, first, span):
    try:
        r = parse_range(f"bytes={first}-{first + span}", size)
    except RangeNotSatisfiable:
        assert first >= size
        return
    assert r is not None
    assert 0 <= r.first <= r.last < size


@pytest.mark.parametrize(
    ("header", "first"),
    [
        ("bytes 100-199/1000", 100),
        ("bytes 0-0/*", 0),
        ("bytes */1000", None),
        ("bytes=100-199", None),
        ("", None),
        (None, None),
    ],
)
def test_where_a_partial_answer_starts(header, first):
    found = content_range(header)
    assert (found.first if found else None) == first


@given(first=st.integers(0, 10**12), span=st.integers(0, 10**12), size=st.integers(1, 10**13))
def test_content_range_we_write_is_read_back(first, span, size):
    written = ByteRange(first, first + span)
    assert content_range(written.content_range(size)) == written


def test_numbers_of_thousands_of_digits_are_positions_past_any_content():
    huge = "9" * 5000
    with pytest.raises(RangeNotSatisfiable):
        parse_range(f"bytes={huge}-", 100)
    assert parse_range(f"bytes=10-{huge}", 100) == ByteRange(10, 99)
    assert parse_range(f"bytes=-{huge}", 100) == ByteRange(0, 99)
    assert parse_range(f"bytes={'0' * 5000}7-9", 100) == ByteRange(7, 9)
    assert content_range(f"bytes {huge}-{huge}/{huge}") == ByteRange(1 << 63, 1 << 63)
    assert content_range("bytes 10-5/100") is None


@given(st.text(alphabet="bytes=-0123456789, ", max_size=60), st.integers(0, 10**12))
def test_any_header_is_a_range_inside_the_content_ignored_or_unsatisfiable(header, size):
    try:
        found = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    assert found is None or 0 <= found.first <= found.last < size
