"""Both storage adapters against real backends: a temp directory and moto's S3 server over TCP."""

from __future__ import annotations

import ctypes
import hashlib
import io
import mmap
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import boto3  # type: ignore[import-untyped]
import pytest

import shared.storage.s3 as s3_module
from shared.errors import ConfigurationError, StorageError
from shared.storage import (
    DOWNLOAD_CHUNK_BYTES,
    Storage,
    check_key,
    new_object_key,
    storage_from_url,
)
from shared.storage.local import LocalStorage
from shared.storage.s3 import S3Storage
from tests.integration.s3server import S3TestServer

MIB = 1024 * 1024
#: Smallest part size S3 allows, so a 12 MiB object becomes a 3-part upload (MiB).
PART_SIZE_MIB = 5
#: Size of the generated blocks of a PatternSource (bytes).
BLOCK_BYTES = 64 * 1024
ACCESS_KEY = "AKIDTESTACCESS"
SECRET_KEY = "SUPERSECRETVALUE"


class SourceFailed(RuntimeError):
    """The test source broke mid-stream (stands in for a failing database cursor)."""


class PatternSource(io.RawIOBase):
    """A stream of unknown length generated block by block; optionally breaks part-way."""

    def __init__(self, *, total: int, seed: int = 1, fail_after: int | None = None) -> None:
        super().__init__()
        self._blocks = _blocks(total, seed)
        self._pending = b""
        self._position = 0
        self._fail_after = fail_after

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._fail_after is not None and self._position >= self._fail_after:
            raise SourceFailed("source broke mid-stream")
        if not self._pending:
            self._pending = next(self._blocks, b"")
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        self._position += count
        return count


def _blocks(total: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    remaining = total
    while remaining > 0:
        size = min(BLOCK_BYTES, remaining)
        yield rng.randbytes(size)
        remaining -= size


def _digest(total: int, seed: int = 1) -> str:
    digest = hashlib.sha256()
    for block in _blocks(total, seed):
        digest.update(block)
    return digest.hexdigest()


def _source(total: int, *, seed: int = 1, fail_after: int | None = None) -> BinaryIO:
    return cast(BinaryIO, PatternSource(total=total, seed=seed, fail_after=fail_after))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _s3_client(endpoint: str) -> Any:
    """An independent client (boto3) to look at what the adapter left on the server."""
    return boto3.client(
        "s3",
        endpoint_url=f"http://{endpoint}",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )


def _s3_storage(endpoint: str, **overrides: Any) -> S3Storage:
    options: dict[str, Any] = {
        "endpoint": endpoint,
        "access_key": ACCESS_KEY,
        "secret_key": SECRET_KEY,
        "bucket": f"test-{uuid.uuid4().hex[:16]}",
        "secure": False,
        "region": "us-east-1",
        "part_size_mib": PART_SIZE_MIB,
        "expire_days": 7,
    }
    options.update(overrides)
    return S3Storage(**options)


@pytest.fixture(scope="module")
def moto_endpoint(s3_server: S3TestServer) -> str:
    return s3_server.endpoint


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """Each adapter, prepared, with an empty root directory or a fresh bucket."""
    adapter: Storage
    if request.param == "local":
        adapter = LocalStorage(root=tmp_path / "store")
    else:
        adapter = _s3_storage(request.getfixturevalue("moto_endpoint"))
    adapter.prepare()
    return adapter


def _leftovers(storage: Storage) -> list[str]:
    """Anything a failed put left behind: temp files, or incomplete multipart uploads."""
    if isinstance(storage, LocalStorage):
        return [str(p) for p in storage.root.rglob("*") if p.is_file()]
    assert isinstance(storage, S3Storage)
    client = _s3_client(storage.endpoint)
    uploads = client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", [])
    return [upload["Key"] for upload in uploads]


def _key() -> str:
    return new_object_key(account_id=7, export_id=uuid.uuid4().hex)


# --- round trips -------------------------------------------------------------------------------


def test_put_then_open_round_trips_a_multipart_stream_of_unknown_length(storage: Storage) -> None:
    total = 12 * MIB
    key = _key()

    written = storage.put(key, _source(total))

    assert written == total
    assert storage.exists(key)
    assert storage.size(key) == total
    chunks = list(storage.open(key))
    # in download-sized chunks: each is one hop to the API's event loop and one socket write
    assert [len(chunk) for chunk in chunks] == [DOWNLOAD_CHUNK_BYTES] * (
        total // DOWNLOAD_CHUNK_BYTES
    )
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == _digest(total)
    if isinstance(storage, S3Storage):
        head = _s3_client(storage.endpoint).head_object(Bucket=storage.bucket, Key=key)
        assert head["ETag"].strip('"').endswith("-3"), "expected a 3-part multipart upload"


def test_put_of_an_empty_stream_stores_an_empty_object(storage: Storage) -> None:
    key = _key()
    assert storage.put(key, _source(0)) == 0
    assert storage.size(key) == 0
    assert b"".join(storage.open(key)) == b""


def test_put_replaces_an_existing_object(storage: Storage) -> None:
    key = _key()
    storage.put(key, io.BytesIO(b"first version"))
    storage.put(key, io.BytesIO(b"second"))
    assert b"".join(storage.open(key)) == b"second"


def test_open_closed_early_releases_and_later_reads_still_work(storage: Storage) -> None:
    key = _key()
    storage.put(key, _source(2 * MIB))
    for _ in range(15):  # more than the pool holds, so a leaked connection would show
        chunks = storage.open(key)
        assert len(next(chunks)) == 2 * MIB
        cast(Any, chunks).close()
    assert hashlib.sha256(b"".join(storage.open(key))).hexdigest() == _digest(2 * MIB)


# --- ranged reads -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 10),
        (1000, None),
        (DOWNLOAD_CHUNK_BYTES - 3, 7),
        (DOWNLOAD_CHUNK_BYTES + 5, 3 * BLOCK_BYTES),
        (5, 0),
    ],
)
def test_open_reads_one_byte_range(storage: Storage, offset: int, length: int | None) -> None:
    key = _key()
    data = b"".join(_blocks(DOWNLOAD_CHUNK_BYTES + 4 * BLOCK_BYTES, 3))
    storage.put(key, io.BytesIO(data))
    end = None if length is None else offset + length
    assert b"".join(storage.open(key, offset=offset, length=length)) == data[offset:end]


def test_s3_ranged_reads_are_ranged_gets(s3_server: S3TestServer) -> None:
    # Given a 2 MiB object
    storage = _s3_storage(s3_server.endpoint)
    storage.prepare()
    key = _key()
    data = b"".join(_blocks(2 * MIB, 4))
    storage.put(key, io.BytesIO(data))
    before = len(s3_server.front.requests)
    # When 100 bytes from the middle, then the tail, are read
    assert b"".join(storage.open(key, offset=MIB, length=100)) == data[MIB : MIB + 100]
    assert b"".join(storage.open(key, offset=2 * MIB - 50)) == data[-50:]
    # Then the server was asked for exactly those ranges, never for the whole object
    gets = [r for r in s3_server.front.requests[before:] if r[0] == "GET"]
    assert [r[2] for r in gets] == [f"bytes={MIB}-{MIB + 99}", f"bytes={2 * MIB - 50}-"]


def test_local_ranged_reads_start_with_a_seek(tmp_path: Path) -> None:
    # A sparse file of 4 GiB with data at the very end: reading from the start would read
    # 4 GiB of zeros; a seek reads 16 bytes.
    storage = LocalStorage(root=tmp_path)
    key = _key()
    storage.put(key, io.BytesIO(b""))
    path = tmp_path / key
    with path.open("r+b") as file:
        file.seek(4 * 1024 * MIB)
        file.write(b"0123456789abcdef")
    chunks = storage.open(key, offset=4 * 1024 * MIB + 4, length=8)
    first = next(chunks)
    assert first == b"456789ab"  # one read of exactly the range, not 256 KiB of zeros
    assert list(chunks) == []


def test_presigned_get_serves_the_attachment_until_it_expires(s3_server: S3TestServer) -> None:
    import urllib.request
    from urllib.error import HTTPError

    storage = _s3_storage(s3_server.endpoint)
    storage.prepare()
    key = _key()
    storage.put(key, io.BytesIO(b"id,total\n1,2.00\n"))
    url = storage.presigned_get(
        key, expires_seconds=2, filename="orders-acme-20261201-1200.csv", content_type="text/csv"
    )
    assert url is not None and "X-Amz-Expires=2" in url
    with urllib.request.urlopen(url) as response:  # noqa: S310 (a loopback test server)
        assert response.read() == b"id,total\n1,2.00\n"
        assert response.headers["Content-Disposition"] == (
            'attachment; filename="orders-acme-20261201-1200.csv"'
        )
        assert response.headers["Content-Type"] == "text/csv"
    time.sleep(3.2)  # X-Amz-Date has whole seconds: 2 s of validity end within 3 s
    with pytest.raises(HTTPError) as refused:
        urllib.request.urlopen(url)  # noqa: S310
    refused.value.close()
    assert refused.value.code == 403


def test_local_storage_has_no_presigned_urls(tmp_path: Path) -> None:
    storage = LocalStorage(root=tmp_path)
    assert (
        storage.presigned_get(_key(), expires_seconds=60, filename="a.csv", content_type="x")
        is None
    )


# --- gzip --------------------------------------------------------------------------------------


def test_a_gzip_copy_stream_goes_up_in_parts_and_gunzips_to_the_csv(storage: Storage) -> None:
    """12 MiB of hardly compressible rows: 3 parts of 5 MiB to S3, in constant memory."""
    import gzip

    from shared.csvfile import GzipCopyStream

    rng = random.Random(5)
    rows = [rng.randbytes(600) + b"\n" for _ in range(21_000)]  # 12.6 MB of noise
    stream = GzipCopyStream(chunks=iter(rows), prefix=b"header\n")
    key = _key()
    written = storage.put(key, cast(BinaryIO, stream))
    stored = b"".join(storage.open(key))
    assert written == stream.size == len(stored) > 2 * PART_SIZE_MIB * MIB
    assert stream.sha256 == hashlib.sha256(stored).hexdigest()
    assert stream.rows == len(rows)
    assert gzip.decompress(stored) == b"header\n" + b"".join(rows)
    if isinstance(storage, S3Storage):
        head = _s3_client(storage.endpoint).head_object(Bucket=storage.bucket, Key=key)
        assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of 3 parts


# --- atomicity ---------------------------------------------------------------------------------


def test_a_source_failing_mid_stream_leaves_nothing_visible(storage: Storage) -> None:
    key = _key()

    with pytest.raises(SourceFailed):
        storage.put(key, _source(12 * MIB, fail_after=7 * MIB))

    assert not storage.exists(key)
    assert _leftovers(storage) == []
    with pytest.raises(StorageError):
        storage.open(key)


def test_a_failed_put_keeps_the_previous_version(storage: Storage) -> None:
    key = _key()
    storage.put(key, io.BytesIO(b"complete old file"))

    with pytest.raises(SourceFailed):
        storage.put(key, _source(12 * MIB, fail_after=7 * MIB))

    assert b"".join(storage.open(key)) == b"complete old file"
    if isinstance(storage, S3Storage):
        assert _leftovers(storage) == []
    else:
        assert _leftovers(storage) == [str(cast(LocalStorage, storage).root / key)]


# --- delete, exists, missing objects ----------------------------------------------------------


def test_delete_is_idempotent(storage: Storage) -> None:
    key = _key()
    storage.put(key, io.BytesIO(b"data"))
    storage.delete(key)
    storage.delete(key)
    assert not storage.exists(key)
    storage.delete(_key())  # never existed


#: A writer that streams zeros into ``put`` until it is killed (argv: root, key).
ENDLESS_WRITER = """
import sys
from pathlib import Path
from shared.storage.local import LocalStorage

class Endless:
    def read(self, size=-1):
        return bytes(65536)

LocalStorage(root=Path(sys.argv[1])).put(sys.argv[2], Endless())
"""


def test_local_delete_also_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    # Given a process killed (SIGKILL) while it wrote an object: its partial file stays
    root = tmp_path / "objects"
    key = _key()
    writer = subprocess.Popen([sys.executable, "-c", ENDLESS_WRITER, str(root), key])
    try:
        deadline = time.monotonic() + 30
        while not any(p.is_file() and p.stat().st_size for p in root.rglob("*")):
            assert time.monotonic() < deadline and writer.poll() is None, "no partial file"
            time.sleep(0.05)
    finally:
        writer.kill()
        writer.wait()
    # When the object is deleted (the rescue of a dead worker's attempt deletes its key)
    LocalStorage(root=root).delete(key)
    # Then nothing of it is left
    assert [p for p in root.rglob("*") if p.is_file()] == []


class _Paused(io.RawIOBase):
    """A stream that hands out one block, then waits for ``go`` before it ends."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        self._sent = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if not self._sent:
            self._sent = True
            self.started.set()
            return b"a,b\n" * 1024
        assert self.go.wait(timeout=30), "never released"
        return b""


def test_local_delete_leaves_a_sibling_keys_write_in_progress_alone(tmp_path: Path) -> None:
    # Given a put of "<name>.gz" under way (its temp file is ".<name>.gz.<random>.part")
    storage = LocalStorage(root=tmp_path / "objects")
    key = _key()
    stream = _Paused()
    outcome: list[object] = []
    writer = threading.Thread(
        target=lambda: outcome.append(_try(lambda: storage.put(key + ".gz", stream)))
    )
    writer.start()
    assert stream.started.wait(timeout=30)
    # When the key "<name>" is deleted while that write goes on
    storage.delete(key)
    stream.go.set()
    writer.join(timeout=30)
    # Then the sibling's write completes and its object is stored whole
    assert outcome == [4096]
    assert b"".join(storage.open(key + ".gz")) == b"a,b\n" * 1024


def _try(call: Callable[[], object]) -> object:
    """What ``call`` returns, or the exception it raised."""
    try:
        return call()
    except Exception as exc:
        return exc


def test_a_missing_object_raises_storage_error(storage: Storage) -> None:
    key = _key()
    assert not storage.exists(key)
    with pytest.raises(StorageError, match="not found"):
        storage.open(key)
    with pytest.raises(StorageError, match="not found"):
        storage.size(key)


BAD_KEYS = [
    "",
    "../escape.csv",
    "accounts/../../escape.csv",
    "/etc/passwd",
    "accounts//x.csv",
    "accounts/./x.csv",
    "accounts/x.csv/",
    "accounts/.hidden",
    "accounts\\..\\x.csv",
    "accounts/x y.csv",
    "accounts/x\x00.csv",
    "a" * 600,
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_unsafe_keys_are_refused(storage: Storage, key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        storage.put(key, io.BytesIO(b"x"))
    with pytest.raises(ValueError):
        storage.open(key)
    with pytest.raises(ValueError):
        storage.exists(key)
    with pytest.raises(ValueError):
        storage.size(key)
    with pytest.raises(ValueError):
        storage.delete(key)
    # Nothing was written anywhere, inside or outside the root.
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_local_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    storage = LocalStorage(root=tmp_path / "store")
    storage.prepare()
    (tmp_path / "secret.txt").write_bytes(b"outside")
    for key in ("../secret.txt", "x/../../secret.txt", str(tmp_path / "secret.txt")):
        with pytest.raises(ValueError):
            storage.open(key)
        with pytest.raises(ValueError):
            storage.delete(key)
    assert (tmp_path / "secret.txt").read_bytes() == b"outside"


# --- prepare -----------------------------------------------------------------------------------


def test_local_prepare_creates_the_root(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    storage = LocalStorage(root=root)
    storage.prepare()
    storage.prepare()
    assert root.is_dir()


def test_s3_prepare_creates_the_bucket_and_a_7_day_lifecycle_rule(moto_endpoint: str) -> None:
    bucket = f"prep-{uuid.uuid4().hex[:16]}"
    storage = storage_from_url(f"s3://{ACCESS_KEY}:{SECRET_KEY}@{moto_endpoint}/{bucket}")
    assert isinstance(storage, S3Storage)
    client = _s3_client(moto_endpoint)
    assert bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]

    storage.prepare()
    storage.prepare()  # idempotent: the bucket exists, the rule is rewritten

    assert bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]
    rules = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert len(rules) == 1
    assert rules[0]["Status"] == "Enabled"
    assert rules[0]["Expiration"] == {"Days": 7}
    assert rules[0]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    key = _key()
    assert storage.put(key, io.BytesIO(b"hello")) == 5


def test_s3_prepare_honours_expire_days(moto_endpoint: str) -> None:
    storage = _s3_storage(moto_endpoint, expire_days=3)
    storage.prepare()
    rules = _s3_client(moto_endpoint).get_bucket_lifecycle_configuration(Bucket=storage.bucket)
    assert rules["Rules"][0]["Expiration"] == {"Days": 3}


# --- an unreachable server ---------------------------------------------------------------------


def test_s3_against_a_dead_server_fails_fast_with_a_safe_storage_error() -> None:
    port = _free_port()  # nothing listens there any more
    storage = storage_from_url(f"s3://{ACCESS_KEY}:{SECRET_KEY}@127.0.0.1:{port}/exports")
    started = time.monotonic()
    errors: list[StorageError] = []
    for call in (
        storage.prepare,
        lambda: storage.put("a/b.csv", io.BytesIO(b"x")),
        lambda: storage.open("a/b.csv"),
        lambda: storage.exists("a/b.csv"),
    ):
        with pytest.raises(StorageError) as caught:
            call()
        errors.append(caught.value)
    assert time.monotonic() - started < 20
    for error in errors:
        assert error.__cause__ is not None
        assert SECRET_KEY not in str(error)
        assert ACCESS_KEY not in str(error)
        assert str(port) not in str(error)


def test_s3_repr_hides_credentials() -> None:
    storage = _s3_storage("127.0.0.1:9")
    assert SECRET_KEY not in repr(storage)
    assert ACCESS_KEY not in repr(storage)


# --- storage_from_url --------------------------------------------------------------------------


def test_file_url_gives_local_storage(tmp_path: Path) -> None:
    storage = storage_from_url(f"file://{tmp_path}/exports%20dir")
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path / "exports dir"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "s3://AK%2F1:se%40cr%2Ft@127.0.0.1:9000/exports",
            {
                "endpoint": "127.0.0.1:9000",
                "access_key": "AK/1",
                "secret_key": "se@cr/t",
                "bucket": "exports",
                "secure": False,
                "region": None,
            },
        ),
        (
            "s3://AK:SK@minio.example.com:9000/exports",
            {"endpoint": "minio.example.com:9000", "secure": True, "region": None},
        ),
        (
            "s3://AK:SK@localhost:9000/exports/?secure=true&region=eu-west-1",
            {"endpoint": "localhost:9000", "secure": True, "region": "eu-west-1"},
        ),
        (
            "s3://AK:SK@minio.internal/exports?secure=false",
            {"endpoint": "minio.internal", "secure": False},
        ),
        (
            "s3://AK:SK@[::1]:9000/my.bucket-1",
            {"endpoint": "[::1]:9000", "secure": False, "bucket": "my.bucket-1"},
        ),
    ],
)
def test_s3_urls_are_parsed(
    url: str, expected: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    captured: dict[str, Any] = {}

    def record(**kwargs: Any) -> object:
        captured.update(kwargs)
        return object()

    monkeypatch.setattr(s3_module, "S3Storage", record)
    storage_from_url(url, part_size_mib=16, expire_days=3)
    assert captured.items() >= expected.items()
    assert captured["part_size_mib"] == 16
    assert captured["expire_days"] == 3


def test_s3_url_builds_a_real_adapter() -> None:
    storage = storage_from_url("s3://AK:SK@127.0.0.1:9000/exports?region=us-east-1")
    assert isinstance(storage, S3Storage)
    assert (storage.endpoint, storage.bucket, storage.secure, storage.region) == (
        "127.0.0.1:9000",
        "exports",
        False,
        "us-east-1",
    )
    assert storage.part_size == 8 * MIB
    assert storage.expire_days == 7


@pytest.mark.parametrize(
    "url",
    [
        "",
        "exports",
        f"{ACCESS_KEY}:{SECRET_KEY}@host:9000/exports",
        f"http://{ACCESS_KEY}:{SECRET_KEY}@host:9000/exports",
        "file://relative/path",
        "file:///abs/path?x=1",
        "file:///abs/../path",
        "s3://host:9000/exports",
        f"s3://{ACCESS_KEY}@host:9000/exports",
        f"s3://{ACCESS_KEY}:{SECRET_KEY}@:9000/exports",
        f"s3://{ACCESS_KEY}:{SECRET_KEY}@host:99999/exports",
        f"s3://{ACCESS_KEY}:{SECRET_KEY}@host:port/exports",
        f"s3://{ACCESS_KEY}:{SECRET_KEY}@host:9000",
        f"s3://{ACCESS_KEY}:{SECRET_KEY}@host:9000/",
        f"s3://{ACCESS_KEY}:{SECRET_KEY}@host:9000/a/b",
        f"s3://{ACCESS_KEY}:{SECRET_KEY}@host:9000/Bad_Bucket",
        f"s3://{ACCESS_KEY}:{SECRET_KEY}@host:9000/exports?secure=maybe",
        f"s3://{ACCESS_KEY}:{SECRET_KEY}@host:9000/exports?{SECRET_KEY}=1",
        f"s3://{ACCESS_KEY}:{SECRET_KEY}@host:9000/exports?secure=true&secure=false",
        f"s3://{ACCESS_KEY}:{SECRET_KEY}@host:9000/exports?region=../{SECRET_KEY}",
        f"s3://{ACCESS_KEY}:{SECRET_KEY}@[::1/exports",
        f"s3://{ACCESS_KEY}:{SECRET_KEY}@host:9000/exports#frag",
    ],
)
def test_bad_urls_raise_configuration_error_without_secrets(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        storage_from_url(url)
    message = str(caught.value)
    assert message.startswith("invalid setting STORAGE_URL: ")
    assert SECRET_KEY not in message
    assert ACCESS_KEY not in message
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ or caught.value.__context__ is None


# --- object keys -------------------------------------------------------------------------------


def test_new_object_keys_are_unique_prefixed_and_valid() -> None:
    keys = {new_object_key(account_id=42, export_id="exp-1") for _ in range(1000)}
    assert len(keys) == 1000
    for key in keys:
        assert key.startswith("accounts/42/exports/exp-1/")
        assert key.endswith(".csv")
        assert check_key(key) == key
        assert len(key.rsplit("/", 1)[1]) >= 24 + len(".csv")


@pytest.mark.parametrize(
    ("account_id", "export_id"),
    [(0, "e"), (-1, "e"), (True, "e"), (1, ""), (1, "../x"), (1, "a/b"), (1, "x" * 65)],
)
def test_new_object_key_rejects_bad_ids(account_id: int, export_id: str) -> None:
    with pytest.raises(ValueError):
        new_object_key(account_id=account_id, export_id=export_id)


def _cached_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all), by mincore(2) on a mapping."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with path.open("rb") as file:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(), 0)
    assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vector = ctypes.create_string_buffer(pages)
        assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
        return sum(byte & 1 for byte in vector.raw), pages
    finally:
        libc.munmap(address, size)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux-only")
def test_local_put_writes_behind_and_leaves_the_page_cache(tmp_path: Path) -> None:
    # A 5M-row export is ~600 MB: put sends written pages to disk as it goes and drops them
    # from the page cache instead of filling it (and leaving it all to the final fsync).
    storage = LocalStorage(root=tmp_path)
    key = _key()
    data = random.Random(7).randbytes(32 * MIB)
    storage.put(key, io.BytesIO(data))
    cached, pages = _cached_pages(tmp_path / key)
    assert pages == 32 * MIB // mmap.PAGESIZE
    assert cached < pages // 8, f"{cached} of {pages} pages still cached"
    assert b"".join(storage.open(key)) == data
