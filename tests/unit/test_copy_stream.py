"""CopyStream: the bytes, rows, size and SHA-256 of a COPY, whatever the read sizes."""

from __future__ import annotations

import hashlib
import io

import pytest

from shared.csvfile import CopyStream


def rows(count: int) -> list[bytes]:
    return [f'A-{n:06d},name {n},"quoted, {n}"\n'.encode() * (1 + n % 7) for n in range(count)]


def read_all(stream: CopyStream, read_size: int) -> bytes:
    """Everything the stream gives, read ``read_size`` bytes at a time (as storage does)."""
    out = io.BytesIO()
    while chunk := stream.read(read_size):
        out.write(chunk)
    return out.getvalue()


@pytest.mark.parametrize("read_size", [1, 7, 64, 1000, 1 << 20])
def test_every_byte_row_and_digest_whatever_the_read_size(read_size: int) -> None:
    prefix = b"\xef\xbb\xbfOrder,Name,Note\n"
    data = rows(500)
    stream = CopyStream(chunks=iter(data), prefix=prefix)
    expected = prefix + b"".join(data)
    assert read_all(stream, read_size) == expected
    assert stream.rows == 500
    assert stream.size == len(expected)
    assert stream.sha256 == hashlib.sha256(expected).hexdigest()


def test_empty_copy_is_just_the_header() -> None:
    stream = CopyStream(chunks=iter([]), prefix=b"h\n")
    assert stream.read() == b"h\n"
    assert (stream.rows, stream.size) == (0, 2)


@pytest.mark.parametrize("read_size", [1, 100, 1 << 20])
def test_gzip_stream_is_the_csv_compressed_and_describes_the_stored_bytes(read_size: int) -> None:
    import gzip

    from shared.csvfile import GzipCopyStream

    prefix = b"Order,Name,Note\n"
    data = rows(3000)
    stream = GzipCopyStream(chunks=iter(data), prefix=prefix)
    stored = read_all(stream, read_size)
    assert gzip.decompress(stored) == prefix + b"".join(data)
    assert stream.rows == 3000
    assert (stream.size, stream.sha256) == (len(stored), hashlib.sha256(stored).hexdigest())
    again = GzipCopyStream(chunks=iter(data), prefix=prefix).read()
    assert again == stored  # no name or time in the header: same CSV, same bytes
