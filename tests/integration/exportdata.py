"""Helpers for export tests: jobs inserted directly, in any state, along legal edges."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from shared import lifecycle
from shared.db import transaction
from shared.errors import StorageError
from shared.filters import OrderFilters
from shared.models import ExportJob, ExportState
from shared.storage import Storage

#: A legal path from queued to each state.
PATHS: dict[ExportState, list[ExportState]] = {
    ExportState.QUEUED: [],
    ExportState.RUNNING: [ExportState.RUNNING],
    ExportState.READY: [ExportState.RUNNING, ExportState.READY],
    ExportState.FAILED: [ExportState.RUNNING, ExportState.FAILED],
    ExportState.CANCELED: [ExportState.CANCELED],
    ExportState.EXPIRED: [ExportState.RUNNING, ExportState.READY, ExportState.EXPIRED],
}


def make_job(
    sessions: sessionmaker[Session],
    *,
    account_id: int,
    user_id: int,
    state: ExportState = ExportState.QUEUED,
    filters: OrderFilters | None = None,
    **values: Any,
) -> uuid.UUID:
    """Insert a job (always born queued, as the trigger demands) and walk it to ``state``."""
    snapshot = (filters or OrderFilters()).to_snapshot()
    with transaction(sessions) as session:
        job = ExportJob(
            account_id=account_id,
            requested_by=user_id,
            state=ExportState.QUEUED,
            filters=snapshot,
            filters_digest=uuid.uuid4().hex,
            column_set_version=1,
            timezone="UTC",
            max_attempts=3,
        )
        session.add(job)
        session.flush()
        export_id = job.id
        previous = ExportState.QUEUED
        for step in PATHS[state]:
            moved = lifecycle.transition(
                session, export_id, to=step, expected=[previous], actor="test"
            )
            assert moved is not None
            previous = step
        if values:
            session.execute(
                text(
                    "UPDATE export_jobs SET "
                    + ", ".join(f"{k} = :{k}" for k in values)
                    + " WHERE id = :id"
                ),
                {**values, "id": export_id},
            )
    return export_id


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
        self.inner.delete(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)
