"""Storage for tests: a prepared local directory, and a wrapper that slows it down or breaks it."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from shared.errors import StorageError
from shared.storage import Storage, storage_from_url


def local_storage(directory: Path) -> Storage:
    """The product's local storage adapter for ``directory``, prepared."""
    storage = storage_from_url(directory.as_uri())
    storage.prepare()
    return storage


class SlowReader(io.RawIOBase):
    """Reads the COPY stream in small steps with a pause: a slow network to storage."""

    def __init__(self, stream: BinaryIO, *, pause: float, step: int = 64 * 1024) -> None:
        super().__init__()
        self._stream, self._pause, self._step = stream, pause, step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        time.sleep(self._pause)
        data = self._stream.read(min(len(buffer), self._step))
        buffer[: len(data)] = data
        return len(data)


class FaultyStorage:
    """Local storage that can be slowed down or made to fail, for fault tests."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.pause = 0.0
        self.failing = False
        #: Deletes fail too (storage unreachable for housekeeping).
        self.failing_deletes = False

    def prepare(self) -> None:
        self.inner.prepare()

    def put(self, key: str, stream: BinaryIO) -> int:
        if self.failing:
            stream.read(1024 * 1024)
            raise StorageError("object storage put failed: server unreachable")
        if self.pause:
            stream = SlowReader(stream, pause=self.pause)  # type: ignore[assignment]
        return self.inner.put(key, stream)

    def open(self, key: str, *, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        return self.inner.open(key, offset=offset, length=length)

    def presigned_get(
        self, key: str, *, expires_seconds: int, filename: str, content_type: str
    ) -> str | None:
        return self.inner.presigned_get(
            key, expires_seconds=expires_seconds, filename=filename, content_type=content_type
        )

    def delete(self, key: str) -> None:
        if self.failing_deletes:
            raise StorageError("object storage delete failed: server unreachable")
        self.inner.delete(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)
