"""Object storage in a local directory (the default for development and tests)."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import BinaryIO

from shared.errors import StorageError
from shared.storage import CHUNK_BYTES, DOWNLOAD_CHUNK_BYTES, Storage, check_key, check_range

#: Suffix of the temporary files that ``put`` writes before renaming them into place.
TEMP_SUFFIX = ".part"
#: ``put`` hands what it wrote to the kernel's writeback (and out of the page cache) every this
#: many bytes: a GB export neither fills the page cache nor leaves it all to the final fsync.
WRITE_BEHIND_BYTES = 8 * 1024 * 1024


class LocalStorage(Storage):
    """Objects as files under ``root``; keys are relative paths that never leave it."""

    def __init__(self, *, root: Path) -> None:
        if not root.is_absolute():
            raise ValueError("root must be an absolute path")
        self._root = root

    @property
    def root(self) -> Path:
        """The directory that holds every object."""
        return self._root

    def __repr__(self) -> str:
        return f"LocalStorage(root={str(self._root)!r})"

    def prepare(self) -> None:
        """Create the root directory."""
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError("cannot create the storage directory") from exc

    def put(self, key: str, stream: BinaryIO) -> int:
        """Write to a temporary file beside the target, fsync it, then rename it into place.

        Written pages go to disk as the write proceeds and leave the page cache (see
        :func:`_write_behind`), so the database's cached pages on the same host stay cached.
        """
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp_name = tempfile.mkstemp(
                prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent
            )
        except OSError as exc:
            raise StorageError("cannot write to the storage directory") from exc
        temp = Path(temp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                size = _copy(stream, out)
                _sync(out.fileno())
                _write_behind(out.fileno())
            _rename(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
            raise
        return size

    def open(self, key: str, *, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Open the file now (missing: StorageError); the chunks close it when done or closed.

        A range starts with a seek: nothing before ``offset`` is read.
        """
        check_range(offset, length)
        path = self._path(key)
        try:
            file = path.open("rb")
            if offset:
                file.seek(offset)
        except FileNotFoundError as exc:
            raise StorageError("stored object not found") from exc
        except OSError as exc:
            raise StorageError("cannot read from the storage directory") from exc
        chunks = _chunks(file, length)
        next(chunks)  # Start the generator so that closing it (or dropping it) closes the file.
        return chunks

    def presigned_get(
        self, key: str, *, expires_seconds: int, filename: str, content_type: str
    ) -> str | None:
        """A local directory serves nothing itself: the API streams the file."""
        return None

    def delete(self, key: str) -> None:
        """Remove the file if it is there, and what a writer killed mid-``put`` left of it (a
        local directory has no lifecycle rule to sweep it)."""
        path = self._path(key)
        try:
            for temp in _temps_of(path):
                temp.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError("cannot delete from the storage directory") from exc

    def exists(self, key: str) -> bool:
        """Whether a file is stored under ``key``."""
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        """Size of the file in bytes."""
        path = self._path(key)
        try:
            return path.stat().st_size
        except FileNotFoundError as exc:
            raise StorageError("stored object not found") from exc
        except OSError as exc:
            raise StorageError("cannot read from the storage directory") from exc

    def _path(self, key: str) -> Path:
        path = self._root.joinpath(*check_key(key).split("/"))
        # Defence in depth: check_key already forbids absolute keys and dot segments.
        if not path.is_relative_to(self._root):
            raise ValueError("invalid object key")
        return path


def _copy(stream: BinaryIO, out: BinaryIO) -> int:
    """Copy ``stream`` to ``out`` chunk by chunk; errors of the source propagate unchanged."""
    size = behind = 0
    while chunk := stream.read(CHUNK_BYTES):
        try:
            out.write(chunk)
            size += len(chunk)
            if size - behind >= WRITE_BEHIND_BYTES:
                out.flush()
                _write_behind(out.fileno())
                behind = size
        except OSError as exc:
            raise StorageError("cannot write to the storage directory") from exc
    return size


def _write_behind(fd: int) -> None:
    """Start writing the file's dirty pages to disk now and drop its clean ones from the page
    cache (``POSIX_FADV_DONTNEED``): pages written back since the last call are recycled instead
    of new ones being taken, and the final fsync has little left to wait for. A hint only:
    nothing changes where the call does not exist (not Linux)."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _sync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise StorageError("cannot write to the storage directory") from exc


def _temps_of(path: Path) -> Iterator[Path]:
    """The temporary files of ``put``s of ``path`` (``.<name>.<random>.part``), never those of a
    sibling key such as ``<name>.gz`` (``.<name>.gz.<random>.part``): mkstemp's random part has
    no dot."""
    prefix = f".{path.name}."
    for temp in path.parent.glob(f"{glob.escape(prefix)}*{TEMP_SUFFIX}"):
        if "." not in temp.name[len(prefix) : -len(TEMP_SUFFIX)]:
            yield temp


def _rename(temp: Path, path: Path) -> None:
    """Atomically replace ``path`` with ``temp``, then persist the directory entry."""
    try:
        os.replace(temp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StorageError("cannot write to the storage directory") from exc


def _chunks(file: BinaryIO, length: int | None = None) -> Generator[bytes, None, None]:
    """Yield an empty priming chunk, then the file's chunks (at most ``length`` bytes in all);
    always close the file."""
    try:
        yield b""
        left = length  # None: to the end
        while left is None or left > 0:
            chunk = file.read(
                DOWNLOAD_CHUNK_BYTES if left is None else min(left, DOWNLOAD_CHUNK_BYTES)
            )
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk
    except OSError as exc:
        raise StorageError("cannot read from the storage directory") from exc
    finally:
        file.close()
