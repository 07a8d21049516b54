"""Export jobs for tests: inserted directly, in any state, along legal edges; and read back
(the row, its history, its outbox events)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from shared import lifecycle
from shared.db import transaction
from shared.filters import OrderFilters
from shared.identity import ensure_account, set_membership, upsert_user
from shared.models import (
    ErrorClass,
    ExportJob,
    ExportState,
    ExportTransition,
    OutboxMessage,
    Role,
)
from shared.seeding import seed_orders
from shared.storage import new_object_key

#: A legal path from queued to each state.
PATHS: dict[ExportState, list[ExportState]] = {
    ExportState.QUEUED: [],
    ExportState.RUNNING: [ExportState.RUNNING],
    ExportState.READY: [ExportState.RUNNING, ExportState.READY],
    ExportState.FAILED: [ExportState.RUNNING, ExportState.FAILED],
    ExportState.CANCELED: [ExportState.CANCELED],
    ExportState.EXPIRED: [ExportState.RUNNING, ExportState.READY, ExportState.EXPIRED],
}


def strays_of(sessions: sessionmaker[Session]) -> dict[str, uuid.UUID | None]:
    """The files housekeeping has still to delete: key -> export id."""
    with sessions() as session:
        return {stray.key: stray.export_id for stray in lifecycle.strays(session, limit=10_000)}


def attempt_key(account_id: int) -> str:
    """An attempt's object key as the runner names one, for tests that claim jobs themselves."""
    return new_object_key(account_id=account_id, export_id="test")


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


def job_of(sessions: sessionmaker[Session], export_id: uuid.UUID | str) -> ExportJob:
    with sessions() as session:
        return session.get_one(ExportJob, uuid.UUID(str(export_id)))


def failed_with(
    sessions: sessionmaker[Session], export_id: uuid.UUID, code: str, error_class: ErrorClass
) -> ExportJob:
    """The job, once asserted failed with the failure ``code`` of ``error_class``."""
    job = job_of(sessions, export_id)
    assert (job.state, job.error_code, job.error_class) == (ExportState.FAILED, code, error_class)
    return job


def history_of(sessions: sessionmaker[Session], export_id: uuid.UUID) -> list[tuple[Any, ...]]:
    """The job's transitions as (to_state, actor, detail), oldest first."""
    with sessions() as session:
        rows = session.execute(
            select(ExportTransition.to_state, ExportTransition.actor, ExportTransition.detail)
            .where(ExportTransition.export_id == export_id)
            .order_by(ExportTransition.id)
        )
        return [tuple(row) for row in rows]


def events_of(sessions: sessionmaker[Session], export_id: uuid.UUID | str) -> list[dict[str, Any]]:
    """The job's outbox events (their payloads), oldest first."""
    with sessions() as session:
        rows = session.scalars(
            select(OutboxMessage.payload)
            .where(OutboxMessage.key == str(export_id))
            .order_by(OutboxMessage.id)
        )
        return list(rows)


def account_and_user(sessions: sessionmaker[Session], slug: str, email: str) -> dict[str, int]:
    """An account and a user (no membership, no orders): ``{"account": id, "user": id}``."""
    with transaction(sessions) as session:
        account = ensure_account(session, slug=slug)
        user = upsert_user(session, email=email, password="long-enough-pw")
        return {"account": account.id, "user": user.id}


def seeded_admin(
    sessions: sessionmaker[Session],
    email: str,
    accounts: Iterable[tuple[str, int, int]],
    *,
    timezone: str = "UTC",
) -> dict[str, int]:
    """A user (``email``) made an admin of each account (slug, orders, seed), whose orders are
    seeded: ``{"user": user id, slug: account id, ...}``."""
    with transaction(sessions) as session:
        user = upsert_user(session, email=email, password="long-enough-pw")
        found = {"user": user.id}
        for slug, orders, seed in accounts:
            account = ensure_account(session, slug=slug, timezone=timezone)
            set_membership(session, account=account, user=user, role=Role.ADMIN)
            seed_orders(session, account, orders=orders, seed=seed)
            found[slug] = account.id
        return found
