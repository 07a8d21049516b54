"""Object storage in an S3-compatible bucket (MinIO in production) through minio-py."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Generator, Iterator
from typing import BinaryIO, cast

import certifi
import urllib3
from minio import Minio
from minio.commonconfig import ENABLED, Filter
from minio.error import MinioException, S3Error
from minio.lifecycleconfig import AbortIncompleteMultipartUpload, Expiration, LifecycleConfig, Rule

from shared.errors import StorageError
from shared.storage import CHUNK_BYTES, DOWNLOAD_CHUNK_BYTES, Storage, check_key, check_range

#: Smallest and largest multipart part size S3 accepts (MiB).
MIN_PART_SIZE_MIB = 5
MAX_PART_SIZE_MIB = 5 * 1024
#: Bytes in a MiB (bytes).
MIB = 1024 * 1024
#: Longest validity of a presigned URL that SigV4 allows (seconds, 7 days).
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
#: Time allowed to open a TCP connection to the server (seconds).
CONNECT_TIMEOUT_SECONDS = 3.0
#: Time allowed for any single socket read or write once connected (seconds).
READ_TIMEOUT_SECONDS = 30.0
#: Retries of a failed request (connection errors, idempotent reads, 5xx) (count).
RETRY_TOTAL = 2
#: Exponential backoff factor between retries (seconds: 0.2, 0.4, ...).
RETRY_BACKOFF_SECONDS = 0.2
#: Connections kept per host in the pool (count).
POOL_MAXSIZE = 10
#: Incomplete multipart uploads left behind by a crash are aborted after this long (days).
ABORT_INCOMPLETE_UPLOAD_DAYS = 1
#: Id of the lifecycle rule that ``prepare`` installs.
LIFECYCLE_RULE_ID = "orders-export-expiry"
#: S3 error codes that mean "this object does not exist".
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "ResourceNotFound"})
#: S3 error codes of a bucket creation that lost a race against another creator.
_BUCKET_RACE_CODES = frozenset({"BucketAlreadyOwnedByYou"})
#: Errors of the client library and of its HTTP transport, mapped to StorageError.
_CLIENT_ERRORS = (MinioException, urllib3.exceptions.HTTPError)


class S3Storage(Storage):
    """Objects in one S3/MinIO bucket; uploads are multipart, downloads stream."""

    def __init__(
        self,
        *,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool,
        region: str | None,
        part_size_mib: int,
        expire_days: int,
    ) -> None:
        if not MIN_PART_SIZE_MIB <= part_size_mib <= MAX_PART_SIZE_MIB:
            raise ValueError(f"part_size_mib must be {MIN_PART_SIZE_MIB}..{MAX_PART_SIZE_MIB}")
        if expire_days < 1:
            raise ValueError("expire_days must be at least 1")
        self._endpoint = endpoint
        self._bucket = bucket
        self._secure = secure
        self._region = region
        self._part_size = part_size_mib * MIB
        self._expire_days = expire_days
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=_http_client(),
        )

    @property
    def endpoint(self) -> str:
        """``host[:port]`` of the server."""
        return self._endpoint

    @property
    def bucket(self) -> str:
        """The bucket that holds every object."""
        return self._bucket

    @property
    def secure(self) -> bool:
        """Whether requests use HTTPS."""
        return self._secure

    @property
    def region(self) -> str | None:
        """The configured region (None: ask the server)."""
        return self._region

    @property
    def part_size(self) -> int:
        """Multipart part size (bytes)."""
        return self._part_size

    @property
    def expire_days(self) -> int:
        """Lifetime of objects set by the lifecycle rule (days)."""
        return self._expire_days

    def __repr__(self) -> str:
        scheme = "https" if self._secure else "http"
        return f"S3Storage(endpoint={scheme}://{self._endpoint}, bucket={self._bucket!r})"

    def prepare(self) -> None:
        """Create the bucket if missing and (re)install the expiry lifecycle rule."""
        rule = Rule(
            ENABLED,
            rule_filter=Filter(prefix=""),
            rule_id=LIFECYCLE_RULE_ID,
            expiration=Expiration(days=self._expire_days),
            abort_incomplete_multipart_upload=AbortIncompleteMultipartUpload(
                days_after_initiation=ABORT_INCOMPLETE_UPLOAD_DAYS
            ),
        )
        try:
            if not self._client.bucket_exists(self._bucket):
                self._make_bucket()
            self._client.set_bucket_lifecycle(self._bucket, LifecycleConfig([rule]))
        except _CLIENT_ERRORS as exc:
            raise _failure("prepare", exc) from exc

    def put(self, key: str, stream: BinaryIO) -> int:
        """Upload part by part; a failure aborts the multipart upload, so nothing shows."""
        key = check_key(key)
        source = _CountingSource(stream)
        try:
            # One upload thread: exactly one part in memory, and an abort that no part
            # upload still in flight can outrun.
            self._client.put_object(
                self._bucket,
                key,
                cast(BinaryIO, source),
                length=-1,
                part_size=self._part_size,
                num_parallel_uploads=1,
            )
        except BaseException as exc:
            if source.error is None:
                if isinstance(exc, _CLIENT_ERRORS):
                    raise _failure("put", exc) from exc
                raise
            # The source failed and minio aborted the upload: surface the source's own error
            # (chained to the abort's error if that failed too).
            if source.error is exc:
                raise
            raise source.error from exc
        return source.count

    def open(self, key: str, *, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Send the request now (missing: StorageError); the chunks release it when done.

        A range is one ranged GET (``Range: bytes=offset-end``): only those bytes travel.
        """
        check_range(offset, length)
        key = check_key(key)
        if length == 0:  # S3 has no empty range; there is nothing to send anyway
            self.size(key)
            return iter(())
        try:
            response = self._client.get_object(self._bucket, key, offset=offset, length=length or 0)
        except _CLIENT_ERRORS as exc:
            raise _failure("open", exc) from exc
        chunks = _chunks(response)
        next(chunks)  # Start the generator so that closing it (or dropping it) releases it.
        return chunks

    def presigned_get(
        self, key: str, *, expires_seconds: int, filename: str, content_type: str
    ) -> str:
        """A presigned GET valid ``expires_seconds`` that names the attachment and its type."""
        if not 1 <= expires_seconds <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"expires_seconds must be 1..{MAX_PRESIGN_SECONDS}")
        try:
            return self._client.presigned_get_object(
                self._bucket,
                check_key(key),
                expires=dt.timedelta(seconds=expires_seconds),
                response_headers={
                    "response-content-disposition": f'attachment; filename="{filename}"',
                    "response-content-type": content_type,
                    "response-cache-control": "no-store",
                },
            )
        except _CLIENT_ERRORS as exc:
            raise _failure("presign", exc) from exc

    def delete(self, key: str) -> None:
        """Remove the object (S3 treats a missing object as removed)."""
        try:
            self._client.remove_object(self._bucket, check_key(key))
        except _CLIENT_ERRORS as exc:
            raise _failure("delete", exc) from exc

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        try:
            self._client.stat_object(self._bucket, check_key(key))
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return False
            raise _failure("exists", exc) from exc
        except _CLIENT_ERRORS as exc:
            raise _failure("exists", exc) from exc
        return True

    def size(self, key: str) -> int:
        """Size of the object in bytes."""
        try:
            stat = self._client.stat_object(self._bucket, check_key(key))
        except _CLIENT_ERRORS as exc:
            raise _failure("size", exc) from exc
        if stat.size is None:
            raise StorageError("object storage returned no object size")
        return int(stat.size)

    def _make_bucket(self) -> None:
        try:
            if self._region:
                self._client.make_bucket(self._bucket, location=self._region)
            else:
                self._client.make_bucket(self._bucket)
        except S3Error as exc:
            if exc.code not in _BUCKET_RACE_CODES:
                raise


class _CountingSource:
    """Wraps the caller's stream: fills each read, counts bytes, remembers its own failure."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.count = 0
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes, fewer only at EOF (minio copies each short read)."""
        pieces: list[bytes] = []
        wanted = size
        try:
            while wanted != 0:
                piece = self._stream.read(CHUNK_BYTES if wanted < 0 else min(wanted, CHUNK_BYTES))
                if not piece:
                    break
                pieces.append(piece)
                if wanted > 0:
                    wanted -= len(piece)
        except BaseException as exc:
            self.error = exc
            raise
        data = b"".join(pieces)
        self.count += len(data)
        return data


def _http_client() -> urllib3.PoolManager:
    """A pool with short timeouts and few retries, so a dead server fails within seconds."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_SECONDS, read=READ_TIMEOUT_SECONDS),
        maxsize=POOL_MAXSIZE,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(
            total=RETRY_TOTAL,
            backoff_factor=RETRY_BACKOFF_SECONDS,
            status_forcelist=(500, 502, 503, 504),
            respect_retry_after_header=False,
        ),
    )


def _chunks(response: urllib3.BaseHTTPResponse) -> Generator[bytes, None, None]:
    """Yield an empty priming chunk, then the body's chunks; always release the connection."""
    try:
        yield b""
        yield from response.stream(DOWNLOAD_CHUNK_BYTES)
    except _CLIENT_ERRORS as exc:
        raise _failure("open", exc) from exc
    finally:
        response.close()
        response.release_conn()


def _failure(operation: str, exc: BaseException) -> StorageError:
    """A StorageError whose message names the operation and the S3 code, never a URL."""
    if isinstance(exc, S3Error):
        if exc.code in _MISSING_CODES:
            return StorageError("stored object not found")
        return StorageError(f"object storage {operation} failed: {exc.code}")
    if isinstance(exc, urllib3.exceptions.HTTPError):
        return StorageError(f"object storage {operation} failed: server unreachable or timed out")
    return StorageError(f"object storage {operation} failed: {type(exc).__name__}")
