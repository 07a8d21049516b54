"""The export state machine: its edges, each with its history row, event and counters.

Every edge (request, claim, progress, finish, fail an attempt, rescue, hand back, send to the
workers, retry, cancel, expire, delete the file) is one function here that does the state change,
names its actor for the history row, writes its outbox event in the same transaction and counts
it once that transaction commits. Callers own the transaction.

Every state change is one conditional ``UPDATE ... WHERE state IN (<expected>)``: when two
processes race, exactly one wins and the other sees ``None``. A trigger refuses any edge not in
:data:`TRANSITIONS` and records each change, with its actor, in ``export_transitions``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import and_, delete, event, exists, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, SessionTransaction

from shared import metrics, outbox
from shared.errors import InvalidTransition
from shared.events import (
    ExportCanceled,
    ExportExpired,
    ExportFailed,
    ExportReady,
    ExportRequested,
    ExportStarted,
)
from shared.failures import WORKER_LOST, Failure
from shared.lanes import FAST, NORMAL
from shared.models import Account, ExportJob, ExportTransition, Notification, StrayObject
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
#: History detail of a job handed back by a stopping worker.
HANDED_BACK_DETAIL = "shutdown"
#: History detail of a job whose worker stopped renewing its lease.
RESCUED_DETAIL = "lease_expired"
#: Actors of the housekeeping edges.
RESCUER = "system:rescuer"
EXPIRY = "system:expiry"
#: Key of the session's after-commit callbacks in ``Session.info``.
_AFTER_COMMIT = "orders_export.after_commit"


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run ``callback`` once the session's current transaction commits (never on rollback):
    counters move only for changes that happened."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    if session.in_nested_transaction():  # a savepoint released: the transaction goes on
        return
    for callback in session.info.pop(_AFTER_COMMIT, []):
        callback()


@event.listens_for(Session, "after_transaction_end")
def _forget_after_rollback(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost transaction ended without a commit
        session.info.pop(_AFTER_COMMIT, None)


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
    attempt_key: Callable[[int], str],
    exclusive_per_account: bool = True,
) -> ExportJob | None:
    """queued -> running for this worker (``ExportStarted``), unless its account already has a
    running export.

    ``attempt_key(account_id)`` names the object this attempt will write; it is recorded with the
    claim (``attempt_key``), so that whoever rescues the job from a dead worker can delete that
    file, and never one a later attempt writes.

    An account-scoped advisory lock serialises claims of one account, so two workers can never
    both see "nothing running" and start two exports of the same account. Small exports made
    inside the request pass ``exclusive_per_account=False``: they must not wait for a big one
    (and never waited in the queue, so only exclusive claims count their queue wait).
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
    job = transition(
        session,
        export_id,
        to=S.RUNNING,
        expected=[S.QUEUED],
        actor=f"worker:{worker_id}",
        where=conditions,
        attempts=ExportJob.attempts + 1,
        worker_id=worker_id,
        attempt_key=attempt_key(account_id),
        lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
        heartbeat_at=now,
        started_at=func.coalesce(ExportJob.started_at, now),
        rows_written=0,
        rows_estimate=None,
        error_code=None,
        error_message=None,
        error_class=None,
    )
    if job is None:
        return None
    _emit(session, job, lambda slug: ExportStarted(export_id=str(job.id), account=slug,
                                                    attempt=job.attempts))  # fmt: skip
    waiting_since = queued_since(session, job.id) if exclusive_per_account else None
    if waiting_since is not None and job.heartbeat_at is not None:  # both PostgreSQL's clock
        waited = max(0.0, (job.heartbeat_at - waiting_since).total_seconds())
        after_commit(session, lambda: metrics.QUEUE_WAIT.observe(waited))
    return job


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
    """The progress edge (no state change, no event): renew the lease and record the rows
    written; False when the job is no longer ours to run."""
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


def _due(session: Session, *where: Any, oldest_first: Any, limit: int) -> list[ExportJob]:
    """Jobs housekeeping should act on, oldest first, locked (SKIP LOCKED: several
    housekeepers never take the same row)."""
    return list(
        session.scalars(
            select(ExportJob)
            .where(*where)
            .order_by(oldest_first)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )


def lease_expired(session: Session, *, limit: int = 100) -> list[ExportJob]:
    """Running jobs whose worker stopped renewing the lease (crashed, frozen, partitioned)."""
    return _due(
        session,
        ExportJob.state == S.RUNNING,
        ExportJob.lease_expires_at < func.now(),
        oldest_first=ExportJob.lease_expires_at,
        limit=limit,
    )


def past_expiry(session: Session, *, limit: int = 100) -> list[ExportJob]:
    """Ready jobs whose file has outlived its expiry."""
    return _due(
        session,
        ExportJob.state == S.READY,
        ExportJob.expires_at < func.now(),
        oldest_first=ExportJob.expires_at,
        limit=limit,
    )


def stale_queued(session: Session, *, older_than_seconds: int, limit: int = 100) -> list[ExportJob]:
    """Queued jobs whose work message was sent long ago (lost with a Redis restart?)."""
    cutoff = func.now() - dt.timedelta(seconds=older_than_seconds)
    return _due(
        session,
        ExportJob.state == S.QUEUED,
        func.coalesce(ExportJob.enqueued_at, ExportJob.created_at) < cutoff,
        oldest_first=ExportJob.created_at,
        limit=limit,
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


def _emit(session: Session, job: ExportJob, make: Callable[[str], Any]) -> None:
    """Write the event ``make(account slug)`` of ``job`` to the outbox."""
    account = session.get_one(Account, job.account_id)
    outbox.add(session, make(account.slug))


def request(
    session: Session, job: ExportJob, *, actor: str, inline: bool, lane: str = NORMAL
) -> ExportJob:
    """A new export (-> queued); ``ExportRequested`` on its worker ``lane`` (shared/lanes.py)
    unless it is made inside the request.

    The insert runs in a savepoint: a concurrent identical request raises ``IntegrityError``
    (the unique in-flight index) and leaves the caller's transaction usable.
    """
    declare_actor(session, actor, "requested")
    with session.begin_nested():
        session.add(job)
        session.flush()
    if not inline:
        _emit(session, job, lambda slug: ExportRequested(
            export_id=str(job.id), account=slug, lane=lane
        ))  # fmt: skip
    return job


def send_to_workers(session: Session, job: ExportJob) -> ExportJob | None:
    """A queued inline export that failed transiently goes to the background workers (the
    fast lane: it is small by definition, it was to be made in the request)."""
    if job.state is not S.QUEUED:
        return None
    mark_enqueued(session, [job.id])
    _emit(session, job, lambda slug: ExportRequested(
        export_id=str(job.id), account=slug, lane=FAST
    ))  # fmt: skip
    return job


def finish(
    session: Session,
    job: ExportJob,
    *,
    worker_id: str,
    expires_at: dt.datetime,
    notify: bool,
    **file: Any,
) -> ExportJob | None:
    """running -> ready with the stored ``file`` (row_count, size_bytes, sha256, storage_key,
    file_name); ``ExportReady``; rows and bytes counted. None when the job was taken away."""
    row_count, size_bytes = file["row_count"], file["size_bytes"]
    done = transition(
        session,
        job.id,
        to=S.READY,
        expected=[S.RUNNING],
        actor=f"worker:{worker_id}",
        where=[ExportJob.worker_id == worker_id],
        rows_written=row_count,
        rows_estimate=row_count,
        finished_at=func.now(),
        expires_at=expires_at,
        lease_expires_at=None,
        **file,
    )
    if done is None:
        return None
    _emit(session, job, lambda slug: ExportReady(
        export_id=str(job.id), account=slug, requested_by=job.requested_by, row_count=row_count,
        size_bytes=size_bytes, expires_at=expires_at.isoformat(), notify=notify,
    ))  # fmt: skip

    def count() -> None:
        metrics.ROWS.inc(row_count)
        metrics.BYTES.inc(size_bytes)

    after_commit(session, count)
    return done


def will_retry(job: ExportJob, failure: Failure) -> bool:
    """The one retry-or-fail rule: a retryable failure goes back to the queue while the job
    has attempts left; anything else fails for good."""
    return failure.retryable and job.attempts < job.max_attempts


def _failed(
    session: Session,
    job: ExportJob,
    failure: Failure,
    *,
    actor: str,
    detail: str,
    notify: bool,
    where: Iterable[Any] = (),
    **values: Any,
) -> tuple[ExportJob | None, bool]:
    """running -> queued (retry) or failed, with the failure recorded and ``ExportFailed``."""
    retry = will_retry(job, failure)
    final = not retry
    message = failure.message_for(final=final)
    if retry:
        values.update(worker_id=None, enqueued_at=func.now())
    else:
        values.update(finished_at=func.now())
    moved = transition(
        session,
        job.id,
        to=S.QUEUED if retry else S.FAILED,
        expected=[S.RUNNING],
        actor=actor,
        detail=detail,
        where=where,
        error_code=failure.code,
        error_message=message,
        error_class=failure.error_class,
        lease_expires_at=None,
        **values,
    )
    if moved is None:
        return None, retry
    _emit(session, job, lambda slug: ExportFailed(
        export_id=str(job.id), account=slug, requested_by=job.requested_by, code=failure.code,
        message=message, retryable=failure.retryable, final=final, notify=notify,
    ))  # fmt: skip

    def count() -> None:
        metrics.FAILURES.labels(failure.code).inc()
        if retry:
            metrics.RETRIES.inc()

    after_commit(session, count)
    return moved, retry


def fail_attempt(
    session: Session, job: ExportJob, failure: Failure, *, worker_id: str, notify: bool
) -> tuple[ExportJob | None, bool]:
    """A worker's attempt failed: back to the queue or failed for good (:func:`will_retry`).
    Returns the moved job (None when it was no longer this worker's) and whether it retries."""
    return _failed(
        session,
        job,
        failure,
        actor=f"worker:{worker_id}",
        detail=failure.code,
        notify=notify,
        where=[ExportJob.worker_id == worker_id],
    )


def rescue(session: Session, job: ExportJob) -> tuple[ExportJob | None, bool]:
    """The worker of a running job stopped renewing its lease: the job is worker_lost, back to
    the queue or failed for good by the same rule as a failed attempt. The lost attempt's file
    (complete if the worker died between its upload and its ready commit) is a stray."""
    moved, retry = _failed(
        session,
        job,
        Failure(WORKER_LOST, WORKER_LOST.message),
        actor=RESCUER,
        detail=RESCUED_DETAIL,
        notify=True,
        worker_id=None,
    )
    if moved is not None and moved.attempt_key is not None:
        record_stray(session, moved.attempt_key, export_id=moved.id)
    return moved, retry


def record_stray(session: Session, key: str, *, export_id: uuid.UUID | None) -> None:
    """``key`` names a file no export may ever point to: housekeeping deletes it (``sweep``).

    Only for the key of an attempt that can no longer finish (its job left ``running`` in this
    transaction, or its worker gave up on it): keys are never reused, so no ready file is one."""
    session.execute(
        pg_insert(StrayObject).values(key=key, export_id=export_id).on_conflict_do_nothing()
    )


def strays(session: Session, *, limit: int = 100) -> list[StrayObject]:
    """Files to delete, oldest first."""
    return list(session.scalars(select(StrayObject).order_by(StrayObject.recorded_at).limit(limit)))


def forget_strays(session: Session, keys: Iterable[str]) -> None:
    """Their files are gone: their rows go too."""
    session.execute(delete(StrayObject).where(StrayObject.key.in_(list(keys))))


def hand_back(session: Session, job: ExportJob, *, worker_id: str) -> ExportJob | None:
    """running -> queued without using up the attempt (the worker is stopping); the
    ``ExportRequested`` gets the job a new work message."""
    moved = transition(
        session,
        job.id,
        to=S.QUEUED,
        expected=[S.RUNNING],
        actor=f"worker:{worker_id}",
        detail=HANDED_BACK_DETAIL,
        where=[ExportJob.worker_id == worker_id, ExportJob.attempts > 0],
        attempts=ExportJob.attempts - 1,
        worker_id=None,
        lease_expires_at=None,
        enqueued_at=func.now(),
    )
    if moved is not None:
        _emit(session, job, lambda slug: ExportRequested(export_id=str(job.id), account=slug))
    return moved


#: What a retried export starts from: no attempts, no error, no file (a run of its own).
NEW_RUN: dict[str, Any] = dict.fromkeys(
    ("error_code", "error_message", "error_class", "finished_at", "expires_at", "row_count",
     "rows_estimate", "storage_key", "size_bytes", "sha256", "file_name", "worker_id",
     "file_deleted_at", "file_deleted_by"),
) | {"attempts": 0, "rows_written": 0}  # fmt: skip


def retry(
    session: Session, job: ExportJob, *, actor: str, requested_by: int, max_attempts: int
) -> ExportJob | None:
    """failed, canceled or expired -> queued as a new run (``ExportRequested``); the old
    run's email records go, so the new run gets its own emails."""
    moved = transition(
        session,
        job.id,
        to=S.QUEUED,
        expected=RETRYABLE_FROM,
        actor=actor,
        detail="retry",
        max_attempts=max_attempts,
        requested_by=requested_by,
        enqueued_at=func.now(),
        **NEW_RUN,
    )
    if moved is None:
        return None
    session.execute(delete(Notification).where(Notification.export_id == job.id))
    _emit(session, job, lambda slug: ExportRequested(export_id=str(job.id), account=slug))
    return moved


def cancel(session: Session, job: ExportJob, *, actor: str) -> ExportJob | None:
    """queued or running -> canceled (``ExportCanceled``); a running export's worker notices
    at its next heartbeat and stops."""
    moved = transition(
        session,
        job.id,
        to=S.CANCELED,
        expected=ACTIVE,
        actor=actor,
        detail="cancel",
        finished_at=func.now(),
        lease_expires_at=None,
    )
    if moved is not None:
        _emit(session, job, lambda slug: ExportCanceled(export_id=str(job.id), account=slug))
        if moved.attempt_key is not None:  # its worker may be gone: the file goes either way
            record_stray(session, moved.attempt_key, export_id=moved.id)
    return moved


def expire(session: Session, export_id: uuid.UUID) -> ExportJob | None:
    """ready -> expired once past ``expires_at`` (its file already deleted); ``ExportExpired``."""
    moved = transition(
        session, export_id, to=S.EXPIRED, expected=[S.READY], actor=EXPIRY,
        where=[ExportJob.expires_at < func.now()], storage_key=None,
    )  # fmt: skip
    if moved is not None:
        _emit(session, moved, lambda slug: ExportExpired(export_id=str(export_id), account=slug))
    return moved


def delete_file(
    session: Session, job: ExportJob, *, actor: str, deleted_by: int | None, deleted_by_name: str
) -> ExportJob | None:
    """ready -> expired at once, by an admin or support (its file already deleted);
    ``ExportExpired`` with reason "deleted"."""
    moved = transition(
        session,
        job.id,
        to=S.EXPIRED,
        expected=[S.READY],
        actor=actor,
        detail="deleted",
        storage_key=None,
        file_deleted_at=func.now(),
        file_deleted_by=deleted_by_name,
    )
    if moved is not None:
        _emit(session, job, lambda slug: ExportExpired(
            export_id=str(job.id), account=slug, reason="deleted", deleted_by=deleted_by,
        ))  # fmt: skip
    return moved
