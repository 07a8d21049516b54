"""Object storage for export files: one interface, a local-directory and an S3/MinIO adapter.

Callers depend on :class:`Storage` only and get an adapter from :func:`storage_from_url`. Object
keys come from :func:`new_object_key`; every adapter refuses keys that :func:`check_key` rejects.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from shared.errors import ConfigurationError
from shared.settings import parse_flag

__all__ = [
    "CHUNK_BYTES",
    "DOWNLOAD_CHUNK_BYTES",
    "Storage",
    "check_key",
    "check_range",
    "new_object_key",
    "storage_from_url",
]

#: Size of the pieces read from a source while it is stored (bytes, 1 MiB).
CHUNK_BYTES = 1024 * 1024
#: Largest chunk ``open`` yields (bytes, 4 MiB): each chunk is one hop from the API's thread pool
#: to its event loop and one write to the client's socket, and Linux lets a socket buffer up to
#: 4 MiB (``net.ipv4.tcp_wmem``). On loopback a 58 MB download streams ~1.2x faster in 4 MiB
#: chunks than in 1 MiB ones, as fast as a zero-copy server, and no faster in bigger ones
#: (``benchmarks/download_chunks.py``, docs/performance.md). A download in flight holds about
#: two chunks.
DOWNLOAD_CHUNK_BYTES = 4 * 1024 * 1024
#: Default multipart part size of S3 uploads (MiB).
DEFAULT_PART_SIZE_MIB = 8
#: Default lifetime of stored objects, enforced by the bucket lifecycle rule (days).
DEFAULT_EXPIRE_DAYS = 7
#: Random bytes in the unguessable part of an object key (bytes; 144 bits).
KEY_TOKEN_BYTES = 18
#: Longest accepted object key (characters; S3 allows 1024 bytes).
MAX_KEY_LENGTH = 512

_KEY_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_EXPORT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_URL_HELP = "expected file:///absolute/path or s3://ACCESS:SECRET@host:port/bucket"


class Storage(Protocol):
    """Where export files live; every write is atomic and every read streams."""

    def prepare(self) -> None:
        """Set up once at service start (root directory, or bucket and lifecycle rule)."""
        ...

    def put(self, key: str, stream: BinaryIO) -> int:
        """Store ``stream`` (read to EOF) under ``key`` atomically; return the byte count."""
        ...

    def open(self, key: str, *, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Stream the object in chunks; closing the iterator releases it (missing: StorageError).

        ``offset``/``length`` read one byte range natively (a seek, or a ranged GET): ``length``
        bytes from ``offset`` (None: to the end). The range must lie within the object.
        """
        ...

    def presigned_get(
        self, key: str, *, expires_seconds: int, filename: str, content_type: str
    ) -> str | None:
        """A URL that serves the object as an attachment for ``expires_seconds`` without us.

        None when the storage cannot serve downloads itself (a local directory).
        """
        ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error. A local directory also removes
        what a writer killed mid-``put`` left of it; S3 leaves such an incomplete multipart
        upload to the bucket's lifecycle rule (aborted after a day)."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        ...

    def size(self, key: str) -> int:
        """Size of the stored object in bytes (missing: StorageError)."""
        ...


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ValueError.

    Segments are ``[A-Za-z0-9._-]`` joined by ``/`` and never start with a dot, so no key is
    absolute, contains ``.``/``..``, or can collide with an adapter's temporary files.
    """
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError("invalid object key")
    if not all(_KEY_SEGMENT.fullmatch(segment) for segment in key.split("/")):
        raise ValueError("invalid object key")
    return key


def check_range(offset: int, length: int | None) -> None:
    """Raise ValueError unless ``offset``/``length`` can describe a byte range."""
    if offset < 0 or (length is not None and length < 0):
        raise ValueError("offset and length must not be negative")


def new_object_key(*, account_id: int, export_id: str) -> str:
    """A fresh, unguessable key under the account's own prefix."""
    if isinstance(account_id, bool) or not isinstance(account_id, int) or account_id < 1:
        raise ValueError("account_id must be a positive integer")
    if not isinstance(export_id, str) or not _EXPORT_ID.fullmatch(export_id):
        raise ValueError("export_id must be 1-64 characters of [A-Za-z0-9_-]")
    token = secrets.token_urlsafe(KEY_TOKEN_BYTES)
    return check_key(f"accounts/{account_id}/exports/{export_id}/{token}.csv")


def lifecycle_days(file_ttl_seconds: int) -> int:
    """Days after which the bucket's lifecycle rule deletes objects: EXPORT_FILE_TTL_SECONDS
    rounded up to whole days, plus one day, so the rule never deletes a file before housekeeping
    expires it, and sweeps up whatever an outage left behind (a failed attempt's object)."""
    return -(-file_ttl_seconds // 86_400) + 1


def storage_from_url(
    url: str,
    *,
    part_size_mib: int = DEFAULT_PART_SIZE_MIB,
    expire_days: int = DEFAULT_EXPIRE_DAYS,
) -> Storage:
    """Build the adapter named by ``STORAGE_URL`` (``file://`` or ``s3://``)."""
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
    except (AttributeError, ValueError):
        raise _invalid(_URL_HELP) from None
    if scheme == "file":
        return _local_from_url(parts)
    if scheme == "s3":
        return _s3_from_url(parts, part_size_mib=part_size_mib, expire_days=expire_days)
    raise _invalid(_URL_HELP)


def _local_from_url(parts: SplitResult) -> Storage:
    from shared.storage.local import LocalStorage

    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise _invalid("a file:// URL takes an absolute path only: file:///absolute/path")
    path = PurePosixPath(unquote(parts.path))
    if not path.is_absolute() or ".." in path.parts:
        raise _invalid("a file:// URL takes an absolute path only: file:///absolute/path")
    return LocalStorage(root=Path(path))


def _s3_from_url(parts: SplitResult, *, part_size_mib: int, expire_days: int) -> Storage:
    from shared.storage.s3 import S3Storage

    try:
        host = parts.hostname
        port = parts.port
        raw_user = parts.username
        raw_password = parts.password
    except ValueError:
        raise _invalid(_URL_HELP) from None
    if not raw_user or not raw_password:
        raise _invalid("an s3:// URL needs credentials: s3://ACCESS:SECRET@host:port/bucket")
    if not host:
        raise _invalid("an s3:// URL needs a host: s3://ACCESS:SECRET@host:port/bucket")
    if parts.fragment:
        raise _invalid(_URL_HELP)
    bucket = parts.path.strip("/")
    if not _BUCKET.fullmatch(bucket):
        raise _invalid("an s3:// URL needs one valid bucket name as its path")

    secure: bool | None = None
    region: str | None = None
    try:
        params = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise _invalid("malformed query string") from None
    seen: set[str] = set()
    for name, value in params:
        if name in seen:
            raise _invalid("a query parameter is repeated")
        seen.add(name)
        if name == "secure":
            secure = parse_flag(value)
            if secure is None:
                raise _invalid("secure must be true or false")
        elif name == "region":
            if not re.fullmatch(r"[a-z0-9-]{1,64}", value):
                raise _invalid("region must be a region name such as us-east-1")
            region = value
        else:
            raise _invalid("unknown query parameter (allowed: secure, region)")

    if secure is None:
        secure = not _is_loopback(host)
    endpoint = f"[{host}]" if ":" in host else host
    if port is not None:
        endpoint = f"{endpoint}:{port}"
    return S3Storage(
        endpoint=endpoint,
        access_key=unquote(raw_user),
        secret_key=unquote(raw_password),
        bucket=bucket,
        secure=secure,
        region=region,
        part_size_mib=part_size_mib,
        expire_days=expire_days,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _invalid(reason: str) -> ConfigurationError:
    # Never include the URL itself: it may carry credentials.
    return ConfigurationError(f"invalid setting STORAGE_URL: {reason}")
