"""What support and on-call read about exports: the verdict, one export in full, lists and stats.

:func:`diagnose` is the one verdict on an export — *fine*, *user can fix* or *needs
engineering* (with the runbook section to open) — used by ``orders-export exports`` and by the
account admin's export pages (which word it "fine", "you can fix it", "we are on it"). It reads
only the job's own row, so the page and the command line always agree.

Attempts are not stored separately: they are read from the state history (each move into
``running`` is a worker's claim, the next move out of it ends the attempt) and from the
``ExportFailed`` event written in the same transaction as the failure.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from shared import backlog
from shared.errors import NotFound
from shared.failures import error_class_of
from shared.models import (
    Account,
    DownloadAttempt,
    ErrorClass,
    ExportJob,
    ExportState,
    ExportTransition,
    Notification,
    NotificationStatus,
    OutboxMessage,
    User,
)
from shared.settings import Settings

#: Where the runbook lives, relative to the repository (sections are its alert headings).
RUNBOOK = "docs/runbook.md"
#: A running export whose lease ran out this long ago should have been rescued (seconds).
STALL_GRACE_SECONDS = 30
#: A queued export waiting longer than this is worth a look (seconds; the alert's threshold).
QUEUED_TOO_LONG_SECONDS = 900
#: An unpublished event older than this is worth a look (seconds; the alert's threshold).
UNPUBLISHED_TOO_LONG_SECONDS = 120
#: Download attempts ``show`` lists (newest first).
SHOWN_DOWNLOADS = 10

_DURATION = re.compile(r"^([1-9][0-9]*)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> dt.timedelta:
    """``30m``, ``6h``, ``7d`` (also ``90s``); ValueError otherwise."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"expected a duration like 30m, 6h or 7d, not {text!r}")
    return dt.timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


# -- the verdict ----------------------------------------------------------------------------------


class Verdict(enum.StrEnum):
    """Who has to act on an export."""

    FINE = "fine"
    USER_CAN_FIX = "user_can_fix"
    NEEDS_ENGINEERING = "needs_engineering"


#: How support and on-call read a verdict (``orders-export exports``).
SUPPORT_WORDS = {
    Verdict.FINE: "fine",
    Verdict.USER_CAN_FIX: "user can fix",
    Verdict.NEEDS_ENGINEERING: "needs engineering",
}
#: How the account admin reads the same verdict (the export pages).
USER_WORDS = {
    Verdict.FINE: "fine",
    Verdict.USER_CAN_FIX: "you can fix it",
    Verdict.NEEDS_ENGINEERING: "we are on it",
}


@dataclass(frozen=True)
class Diagnosis:
    """A verdict, why, and for engineering the runbook section to open."""

    verdict: Verdict
    reason: str
    runbook: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "words": SUPPORT_WORDS[self.verdict],
            "reason": self.reason,
            "runbook": self.runbook,
        }


def section(alert: str) -> str:
    """The runbook section of an alert, as its ``runbook_url`` names it."""
    return f"{RUNBOOK}#{alert.lower()}"


def diagnose(job: ExportJob, *, now: dt.datetime) -> Diagnosis:
    """The verdict on ``job`` at ``now``, from its row alone."""
    state, code = job.state, job.error_code
    if state is ExportState.FAILED:
        if job.error_class is ErrorClass.USER:
            return Diagnosis(Verdict.USER_CAN_FIX, f"{code}: narrow the filters and export again")
        if job.error_class is ErrorClass.RETRYABLE:
            return Diagnosis(
                Verdict.USER_CAN_FIX,
                f"{code}: the automatic retries were used up; retry later",
            )
        return Diagnosis(
            Verdict.NEEDS_ENGINEERING,
            f"{code or 'unknown error'}: retrying will not help",
            section("OrdersExportJobsFailing"),
        )
    if state is ExportState.RUNNING:
        lease = job.lease_expires_at
        if lease is not None and (now - lease).total_seconds() > STALL_GRACE_SECONDS:
            return Diagnosis(
                Verdict.NEEDS_ENGINEERING,
                f"running without a heartbeat since {lease.isoformat()}, not rescued",
                section("OrdersExportStalledJobs"),
            )
        return Diagnosis(Verdict.FINE, f"running on {job.worker_id}, attempt {job.attempts}")
    if state is ExportState.QUEUED:
        if code:
            return Diagnosis(
                Verdict.FINE, f"attempt {job.attempts} failed ({code}); retried by itself"
            )
        return Diagnosis(Verdict.FINE, "waiting for a worker")
    if state is ExportState.READY:
        return Diagnosis(Verdict.FINE, "the file is ready")
    if state is ExportState.CANCELED:
        return Diagnosis(Verdict.FINE, "canceled")
    return Diagnosis(Verdict.FINE, "the file is gone; export again for a fresh one")


# -- finding exports --------------------------------------------------------------------------


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def now_of(session: Session) -> dt.datetime:
    """PostgreSQL's clock (every time the history holds is on it)."""
    moment: dt.datetime = session.scalar(select(func.now()))  # type: ignore[assignment]
    return moment


def find(session: Session, export_id: str) -> tuple[ExportJob, Account]:
    """The export and its account, whoever asks (support sees every account)."""
    try:
        key = uuid.UUID(export_id)
    except ValueError:
        raise NotFound(f"no export {export_id}") from None
    row = session.execute(
        select(ExportJob, Account).join(Account, Account.id == ExportJob.account_id)
        .where(ExportJob.id == key)
    ).first()  # fmt: skip
    if row is None:
        raise NotFound(f"no export {export_id}")
    return row[0], row[1]


def list_exports(
    session: Session,
    *,
    account: str | None = None,
    states: Sequence[ExportState] = (),
    since: dt.timedelta | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Exports newest first, one summary each (``exports list``)."""
    query = (
        select(ExportJob, Account.slug, User.email)
        .join(Account, Account.id == ExportJob.account_id)
        .join(User, User.id == ExportJob.requested_by)
        .order_by(ExportJob.created_at.desc(), ExportJob.id.desc())
        .limit(limit)
    )
    if account is not None:
        if session.scalar(select(Account.id).where(Account.slug == account)) is None:
            raise NotFound(f"no account {account}")
        query = query.where(Account.slug == account)
    if states:
        query = query.where(ExportJob.state.in_(states))
    if since is not None:
        query = query.where(ExportJob.created_at >= func.now() - since)
    return [
        {
            "id": str(job.id),
            "account": slug,
            "state": job.state.value,
            "requester": email,
            "created_at": _iso(job.created_at),
            "row_count": job.row_count,
            "rows_written": job.rows_written,
            "attempts": job.attempts,
            "error_code": job.error_code,
        }
        for job, slug, email in session.execute(query)
    ]


# -- one export in full -------------------------------------------------------------------------


def _error(code: str | None, error_class: ErrorClass | None, message: str | None) -> Any:
    if code is None:
        return None
    return {
        "code": code,
        "class": error_class.value if error_class is not None else None,
        "message": message,
    }


def attempts_of(
    job: ExportJob,
    history: Iterable[ExportTransition],
    failures: dict[dt.datetime, dict[str, Any]],
) -> list[dict[str, Any]]:
    """Every worker run of the export, from its history and its ``ExportFailed`` events.

    ``failures`` maps the time of each ``ExportFailed`` event to its payload: it was written in
    the transaction that ended the attempt, so it carries the very time of that transition.
    """
    runs: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for step in history:
        if current is not None and step.from_state is ExportState.RUNNING:
            event = failures.get(step.at)
            outcome = step.to_state.value
            if step.to_state is ExportState.QUEUED:
                outcome = "retry" if event is not None else "requeued"
            current.update(ended_at=_iso(step.at), ended_by=step.actor, outcome=outcome)
            if event is not None:
                code = str(event.get("code"))
                error_class = (
                    ErrorClass.RETRYABLE if event.get("retryable") else error_class_of(code)
                )
                current["error"] = _error(code, error_class, event.get("message"))
            elif step.to_state is ExportState.FAILED:
                current["error"] = _error(step.detail, None, None)
            current = None
        if step.to_state is ExportState.RUNNING:
            worker = step.actor.removeprefix("worker:")
            current = {
                "number": len(runs) + 1,
                "worker_id": worker,
                "started_at": _iso(step.at),
                "ended_at": None,
                "ended_by": None,
                "outcome": "running",
                "error": None,
            }
            runs.append(current)
    last = runs[-1] if runs else None
    if last is not None and last["error"] is not None and last["error"]["code"] == job.error_code:
        last["error"]["class"] = job.error_class.value if job.error_class else None
    return runs


def _email_status(row: Notification) -> str:
    return row.status  # failed: given up for good (a permanent refusal, or past the bound)


def describe(session: Session, job: ExportJob, account: Account) -> dict[str, Any]:
    """Everything about one export (``exports show``); the layout is docs/cli.md's."""
    now = now_of(session)
    requester = session.get(User, job.requested_by)
    history = list(
        session.scalars(
            select(ExportTransition)
            .where(ExportTransition.export_id == job.id)
            .order_by(ExportTransition.id)
        )
    )
    events = list(
        session.scalars(
            select(OutboxMessage).where(OutboxMessage.key == str(job.id)).order_by(OutboxMessage.id)
        )
    )
    failures = {e.created_at: e.payload for e in events if e.payload.get("type") == "ExportFailed"}
    emails = list(
        session.scalars(
            select(Notification)
            .where(Notification.export_id == job.id)
            .order_by(Notification.created_at)
        )
    )
    downloads = session.execute(
        select(DownloadAttempt, User.email)
        .outerjoin(User, User.id == DownloadAttempt.user_id)
        .where(DownloadAttempt.export_id == job.id)
        .order_by(DownloadAttempt.id.desc())
        .limit(SHOWN_DOWNLOADS)
    ).all()
    file = None
    if job.file_name is not None or job.storage_key is not None:
        file = {
            "name": job.file_name,
            "size_bytes": job.size_bytes,
            "sha256": job.sha256,
            "storage_key": job.storage_key,
            "expires_at": _iso(job.expires_at),
        }
    body: dict[str, Any] = {
        "export": {
            "id": str(job.id),
            "account": account.slug,
            "state": job.state.value,
            "requester": {
                "id": job.requested_by,
                "email": requester.email if requester is not None else None,
            },
            "filters": job.filters,
            "options": {"utf8_bom": job.utf8_bom},
            "timezone": job.timezone,
            "row_count": job.row_count,
            "rows_written": job.rows_written,
            "rows_estimate": job.rows_estimate,
            "attempts": job.attempts,
            "max_attempts": job.max_attempts,
            "worker_id": job.worker_id,
            "heartbeat_at": _iso(job.heartbeat_at),
            "lease_expires_at": _iso(job.lease_expires_at),
            "created_at": _iso(job.created_at),
            "started_at": _iso(job.started_at),
            "finished_at": _iso(job.finished_at),
            "error": _error(job.error_code, job.error_class, job.error_message),
            "file": file,
        },
        "verdict": diagnose(job, now=now).to_json(),
        "notes": [],
        "history": [
            {
                "at": _iso(step.at),
                "from": step.from_state.value if step.from_state is not None else None,
                "to": step.to_state.value,
                "actor": step.actor,
                "detail": step.detail,
            }
            for step in history
        ],
        "attempts": attempts_of(job, history, failures),
        "emails": [
            {
                "kind": row.kind,
                "recipient": row.recipient,
                "status": _email_status(row),
                "attempts": row.attempts,
                "last_error": row.last_error,
                "created_at": _iso(row.created_at),
                "sent_at": _iso(row.sent_at),
            }
            for row in emails
        ],
        "events": [
            {
                "id": row.id,
                "type": row.payload.get("type"),
                "topic": row.topic,
                "created_at": _iso(row.created_at),
                "published": row.published_at is not None,
                "published_at": _iso(row.published_at),
                "attempts": row.attempts,
                "last_error": row.last_error,
            }
            for row in events
        ],
        "downloads": [
            {
                "at": _iso(attempt.at),
                "user": {"id": attempt.user_id, "email": email}
                if attempt.user_id is not None
                else None,
                "outcome": attempt.outcome,
                "client_ip": attempt.client_ip,
            }
            for attempt, email in downloads
        ],
    }
    body["notes"] = _notes(job, history, emails, events, now=now)
    return body


def _notes(
    job: ExportJob,
    history: Sequence[ExportTransition],
    emails: Sequence[Notification],
    events: Sequence[OutboxMessage],
    *,
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """What is wrong around the export (delivery, waiting), with the runbook section."""
    notes: list[dict[str, Any]] = []
    if job.state is ExportState.QUEUED:
        entered = max((s.at for s in history if s.to_state is ExportState.QUEUED), default=None)
        waited = (now - entered).total_seconds() if entered is not None else 0.0
        if waited > QUEUED_TOO_LONG_SECONDS:
            notes.append(
                {
                    "text": f"queued for {int(waited // 60)} min",
                    "runbook": section("OrdersExportQueuedTooOld"),
                }
            )
    for row in events:
        age = (now - row.created_at).total_seconds()
        if row.published_at is None and age > UNPUBLISHED_TOO_LONG_SECONDS:
            notes.append(
                {
                    "text": f"event {row.payload.get('type')} unpublished for {int(age)} s"
                    + (f" ({row.last_error})" if row.last_error else ""),
                    "runbook": section("OrdersExportOutboxNotDraining"),
                }
            )
    for email in emails:
        if _email_status(email) == "pending":
            notes.append(
                {
                    "text": f"{email.kind} email not delivered after {email.attempts} attempts"
                    + (f" ({email.last_error})" if email.last_error else ""),
                    "runbook": section("OrdersExportNotifierFailing"),
                }
            )
    return notes


# -- the figures of the dashboard -------------------------------------------------------------


def _counts(rows: Iterable[Any]) -> dict[str, int]:
    return {str(code or "unknown"): int(count) for code, count in rows}


def stats(session: Session, *, settings: Settings, since: dt.timedelta) -> dict[str, Any]:
    """Counts per state and per error code, queue age, outbox and email backlog (``exports
    stats``). The gauges are the worker's own queries (``shared.backlog.read_jobs``)."""
    now = now_of(session)
    start = now - since
    code = OutboxMessage.payload["code"].astext
    failures = session.execute(
        select(code, func.count())
        .where(OutboxMessage.payload["type"].astext == "ExportFailed")
        .where(OutboxMessage.created_at >= start)
        .group_by(code)
        .order_by(code)
    ).all()
    failed_exports = session.execute(
        select(ExportJob.error_code, func.count())
        .where(ExportJob.state == ExportState.FAILED)
        .group_by(ExportJob.error_code)
        .order_by(ExportJob.error_code)
    ).all()
    skipped = Notification.status == NotificationStatus.SKIPPED
    given_up = Notification.status == NotificationStatus.FAILED
    final = skipped | given_up
    pending = session.scalar(
        select(func.count()).where(Notification.status == NotificationStatus.PENDING)
    )
    given_up_count = session.scalar(
        select(func.count()).where(Notification.created_at >= start, given_up)
    )
    sent = session.scalar(select(func.count()).where(Notification.sent_at >= start))
    skipped_count = session.scalar(
        select(func.count()).where(Notification.created_at >= start, skipped)
    )
    # Delivery attempts that failed: every attempt but the one that got through (or was refused).
    done = Notification.sent_at.is_not(None) | (final & (Notification.attempts > 0))
    failed_deliveries = session.scalar(
        select(func.sum(Notification.attempts - case((done, 1), else_=0))).where(
            Notification.created_at >= start
        )
    )
    snapshot = backlog.read_jobs(session, stalled_after_seconds=settings.export_lease_seconds)
    return {
        "now": _iso(now),
        "since": _iso(start),
        "jobs": {
            "per_state": dict(snapshot.per_state),
            "oldest_queued_seconds": round(snapshot.oldest_queued_seconds, 1),
            "stalled": snapshot.stalled,
        },
        "failed_attempts": {"by_error_code": {str(c or "unknown"): int(n) for c, n in failures}},
        "failed_exports": {
            "by_error_code": {str(c or "unknown"): int(n) for c, n in failed_exports}
        },
        "outbox": {
            "pending": snapshot.outbox_pending,
            "oldest_pending_seconds": round(snapshot.outbox_oldest_pending_seconds, 1),
        },
        "emails": {
            "pending": int(pending or 0),
            "failed_deliveries": int(failed_deliveries or 0),
            "sent": int(sent or 0),
            "skipped": int(skipped_count or 0),
            "failed": int(given_up_count or 0),
        },
    }
