"""Helpers for export tests: jobs inserted directly, in any state, along legal edges."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from shared import jobs
from shared.db import transaction
from shared.filters import OrderFilters
from shared.models import ExportJob, ExportState

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
            moved = jobs.transition(session, export_id, to=step, expected=[previous], actor="test")
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
