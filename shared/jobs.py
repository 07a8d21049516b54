"""The export state machine and the database operations that move jobs along it.

Every state change is one conditional ``UPDATE ... WHERE state IN (<expected>)``: when two
processes race, exactly one wins and the other sees ``None``. A trigger refuses any edge not in
:data:`TRANSITIONS` and records each change, with its actor, in ``export_transitions``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, exists, func, select, text, update
from sqlalchemy.orm import Session

from shared.errors import InvalidTransition
from shared.models import ExportJob, ExportTransition
from shared.models import ExportState as S

#: Allowed edges (the migration's trigger holds the same list).
TRANSITIONS: dict[S, frozenset[S]] = {
    S.QUEUED: frozenset({S.RUNNING, S.CANCELED}),
    S.RUNNING: frozenset({S.READY, S.FAILED, S.CANCELED, S.QUEUED}),
    S.READY: frozenset({S.EXPIRED}),
    S.FAILED: frozenset({S.QUEUED}),
    S.CANCELED: frozenset({S.QUEUED}),
    S.EXPIRED: frozenset({S.QUEUED}),
}
#: States in which a job still has work ahead (they count against the per-user cap).
ACTIVE = frozenset({S.QUEUED, S.RUNNING})
#: States a user may retry from.
RETRYABLE_FROM = frozenset({S.FAILED, S.CANCELED, S.EXPIRED})
#: SQLSTATE the transition trigger raises.
INVALID_TRANSITION_SQLSTATE = "OE001"


def declare_actor(session: Session, actor: str, detail: str | None = None) -> None:
    """Name who is acting in this transaction; the history trigger records it."""
    session.execute(
        text(
            "SELECT set_config('orders_export.actor', :actor, true),"
            " set_config('orders_export.detail', :detail, true)"
        ),
        {"actor": actor, "detail": detail or ""},
    )


def transition(
    session: Session,
    export_id: uuid.UUID,
    *,
    to: S,
    expected: Iterable[S],
    actor: str,
    detail: str | None = None,
    where: Iterable[Any] = (),
    **values: Any,
) -> ExportJob | None:
    """Move the job to ``to`` if it is in one of ``expected`` (and ``where`` holds).

    Returns the updated job, or None when another process got there first.
    """
    sources = tuple(expected)
    for source in sources:
        if to not in TRANSITIONS[source]:
            raise InvalidTransition(f"an export cannot go from {source} to {to}")
    declare_actor(session, actor, detail)
    statement = (
        update(ExportJob)
        .where(ExportJob.id == export_id, ExportJob.state.in_(sources), *where)
        .values(state=to, **values)
        .returning(ExportJob)
        .execution_options(populate_existing=True)
    )
    return session.scalars(statement).one_or_none()


def claim(
    session: Session,
    export_id: uuid.UUID,
    *,
    worker_id: str,
    lease_seconds: int,
    exclusive_per_account: bool = True,
) -> ExportJob | None:
    """queued -> running for this worker, unless its account already has a running export.

    An account-scoped advisory lock serialises claims of one account, so two workers can never
    both see "nothing running" and start two exports of the same account. Small exports made
    inside the request pass ``exclusive_per_account=False``: they must not wait for a big one.
    """
    account_id = session.scalar(select(ExportJob.account_id).where(ExportJob.id == export_id))
    if account_id is None:
        return None
    conditions: list[Any] = [ExportJob.attempts < ExportJob.max_attempts]
    if exclusive_per_account:
        session.execute(select(func.pg_advisory_xact_lock(account_id)))
        other = ExportJob.__table__.alias("other")
        running = and_(
            other.c.account_id == account_id, other.c.state == S.RUNNING, other.c.id != export_id
        )
        conditions.append(~exists().where(running))
    now = func.now()
    return transition(
        session,
        export_id,
        to=S.RUNNING,
        expected=[S.QUEUED],
        actor=f"worker:{worker_id}",
        where=conditions,
        attempts=ExportJob.attempts + 1,
        worker_id=worker_id,
        lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
        heartbeat_at=now,
        started_at=func.coalesce(ExportJob.started_at, now),
        rows_written=0,
        rows_estimate=None,
        error_code=None,
        error_message=None,
        error_class=None,
    )


def queued_since(session: Session, export_id: uuid.UUID) -> dt.datetime | None:
    """When the job last entered ``queued`` (its history; a retry starts the wait over)."""
    return session.scalar(
        select(func.max(ExportTransition.at)).where(
            ExportTransition.export_id == export_id, ExportTransition.to_state == S.QUEUED
        )
    )


def heartbeat(
    session: Session,
    export_id: uuid.UUID,
    *,
    worker_id: str,
    lease_seconds: float,
    rows_written: int,
    rows_estimate: int | None,
) -> bool:
    """Renew the lease and record progress; False when the job is no longer ours to run."""
    now = func.now()
    result = session.execute(
        update(ExportJob)
        .where(
            ExportJob.id == export_id,
            ExportJob.state == S.RUNNING,
            ExportJob.worker_id == worker_id,
        )
        .values(
            lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            rows_written=rows_written,
            rows_estimate=func.coalesce(rows_estimate, ExportJob.rows_estimate),
        )
        .returning(ExportJob.id)
    )
    return result.first() is not None


def lease_expired(session: Session, *, limit: int = 100) -> list[ExportJob]:
    """Running jobs whose worker stopped renewing the lease (crashed, frozen, partitioned)."""
    return list(
        session.scalars(
            select(ExportJob)
            .where(ExportJob.state == S.RUNNING, ExportJob.lease_expires_at < func.now())
            .order_by(ExportJob.lease_expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )


def past_expiry(session: Session, *, limit: int = 100) -> list[ExportJob]:
    """Ready jobs whose file has outlived its expiry."""
    return list(
        session.scalars(
            select(ExportJob)
            .where(ExportJob.state == S.READY, ExportJob.expires_at < func.now())
            .order_by(ExportJob.expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )


def stale_queued(session: Session, *, older_than_seconds: int, limit: int = 100) -> list[ExportJob]:
    """Queued jobs whose work message was sent long ago (lost with a Redis restart?)."""
    cutoff = func.now() - dt.timedelta(seconds=older_than_seconds)
    return list(
        session.scalars(
            select(ExportJob)
            .where(
                ExportJob.state == S.QUEUED,
                func.coalesce(ExportJob.enqueued_at, ExportJob.created_at) < cutoff,
            )
            .order_by(ExportJob.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )


def mark_enqueued(session: Session, export_ids: Iterable[uuid.UUID]) -> None:
    ids = list(export_ids)
    if ids:
        session.execute(
            update(ExportJob).where(ExportJob.id.in_(ids)).values(enqueued_at=func.now())
        )


def count_active(session: Session, *, user_id: int) -> int:
    return int(
        session.scalar(
            select(func.count()).where(
                ExportJob.requested_by == user_id, ExportJob.state.in_(ACTIVE)
            )
        )
        or 0
    )
