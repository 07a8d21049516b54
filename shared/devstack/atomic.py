"""Files that readers see either complete or not at all."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

#: Permission bits of files written by :func:`write_atomic` unless told otherwise.
DEFAULT_FILE_MODE = 0o644


def write_atomic(path: Path, data: str | bytes, *, mode: int = DEFAULT_FILE_MODE) -> None:
    """Write ``data`` to a hidden temporary name next to ``path``, fsync it, then rename it.

    The rename is atomic on POSIX, so a reader polling for ``path`` never sees half a file.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
