"""One Range header against a file of SIZE bytes: the bytes to send, the whole file, or 416."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.api.byteranges import ByteRange, RangeNotSatisfiable, requested_range

ETAG = '"' + "ab" * 32 + '"'


@given(size=st.integers(1, 10_000), start=st.integers(0, 20_000), end=st.integers(0, 20_000))
def test_a_first_last_range_sends_what_slicing_would(size: int, start: int, end: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    header = f"bytes={start}-{end}"
    if end < start:
        assert requested_range(header, None, size=size, etag=ETAG) is None  # invalid: ignored
    elif start >= size:
        with pytest.raises(RangeNotSatisfiable) as refused:
            requested_range(header, None, size=size, etag=ETAG)
        assert refused.value.content_range == f"bytes */{size}"
    else:
        got = requested_range(header, None, size=size, etag=ETAG)
        assert got is not None
        assert data[got.start : got.end + 1] == data[start : end + 1]
        assert got.content_range == f"bytes {start}-{min(end, size - 1)}/{size}"


@given(size=st.integers(1, 10_000), suffix=st.integers(1, 20_000))
def test_a_suffix_range_sends_the_last_bytes(size: int, suffix: int) -> None:
    got = requested_range(f"bytes=-{suffix}", None, size=size, etag=ETAG)
    assert got == ByteRange(max(0, size - suffix), size - 1, size)


@pytest.mark.parametrize(
    "header", ["bytes=0-1,5-6", "bytes=", "bytes=-", "pages=0-1", "bytes=a-b", "0-1", "bytes=1-2-3"]
)
def test_what_is_not_one_byte_range_gets_the_whole_file(header: str) -> None:
    assert requested_range(header, None, size=100, etag=ETAG) is None


def test_if_range_must_be_the_current_strong_etag() -> None:
    assert requested_range("bytes=0-9", ETAG, size=100, etag=ETAG) == ByteRange(0, 9, 100)
    for other in ('"other"', f"W/{ETAG}", "Tue, 01 Dec 2026 10:00:00 GMT"):
        assert requested_range("bytes=0-9", other, size=100, etag=ETAG) is None
    assert requested_range("bytes=0-9", ETAG, size=100, etag=None) is None


def test_an_empty_file_has_no_satisfiable_range() -> None:
    for header in ("bytes=0-", "bytes=-1", "bytes=0-0"):
        with pytest.raises(RangeNotSatisfiable):
            requested_range(header, None, size=0, etag=ETAG)
    assert requested_range(None, None, size=0, etag=ETAG) is None
