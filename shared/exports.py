"""Export requests and their management: the use cases behind the export endpoints.

The API calls these with an authenticated user; they check membership and role at the time of
the call, validate with the report's own filter code, and write job + outbox row together.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from shared import lifecycle, support, wire
from shared.access import account_for, export_for
from shared.columns import COLUMN_SET_VERSION
from shared.db import transaction
from shared.errors import (
    Conflict,
    ExportsDisabled,
    Forbidden,
    InlineExportFailed,
    NotFound,
    OrdersExportError,
    TooManyActiveExports,
    TooManyInlineExports,
    TooManyRows,
    ValidationError,
)
from shared.export_options import COMPRESSIONS, DEFAULT_OPTIONS, job_options
from shared.filters import OrderFilters, parse_filter_object
from shared.flags import FlagCache
from shared.lanes import count_budget, lane_for
from shared.models import Account, ErrorClass, ExportJob, ExportState, Role, User
from shared.report import count_rows, estimate_rows, size_of
from shared.runner import ExportRunner, RunOutcome
from shared.settings import Settings
from shared.signing import SigningKeys, download_path
from shared.storage import Storage

log = logging.getLogger(__name__)

#: Seconds a client should wait before asking again after hitting the active-export cap.
ACTIVE_CAP_RETRY_AFTER = 30
#: Longest accepted Idempotency-Key header (characters).
MAX_IDEMPOTENCY_KEY = 200
#: Who the pages say deleted a file when no user of the account did (the support CLI).
SUPPORT_NAME = "support"


class Disposition(enum.Enum):
    """What became of an export request (the API tells it by its status: 200, 201, 202)."""

    IN_FLIGHT = "in_flight"  # an identical export is already in flight, or an idempotent replay
    MADE = "made"  # small: made inside the request, ready to download
    QUEUED = "queued"  # for the workers: big, or small but hit by a transient failure


@dataclass(frozen=True)
class Requested:
    """The outcome of an export request."""

    job: ExportJob
    #: IN_FLIGHT (a duplicate in flight or an idempotent replay) or QUEUED (a new job)
    disposition: Disposition
    #: True when the job should be generated inside this request (small export).
    inline: bool
    #: The job's account, as the request read it (kept: the session's identity map holds its
    #: objects weakly, so without a reference it would be read again).
    account: Account


def filters_digest(filters: OrderFilters) -> str:
    canonical = json.dumps(filters.to_snapshot(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def request_digest(filters: OrderFilters, options: dict[str, Any]) -> str:
    """What the duplicate check compares: the filters and the options that differ from their
    defaults (so a request without options has the digest of its filters alone)."""
    chosen = {k: v for k, v in options.items() if v != DEFAULT_OPTIONS[k]}
    if not chosen:
        return filters_digest(filters)
    canonical = json.dumps(
        {"filters": filters.to_snapshot(), "options": chosen},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_options(raw: object) -> dict[str, Any]:
    options = dict(DEFAULT_OPTIONS)
    if raw is None:
        return options
    if not isinstance(raw, dict):
        raise ValidationError("options", "expected a JSON object")
    for name, value in raw.items():
        if name not in wire.ExportOptions.model_fields:
            raise ValidationError(f"options.{name}", "unknown option")
        if name == "compression":
            if value not in COMPRESSIONS or not isinstance(value, str):
                raise ValidationError("options.compression", 'expected "none" or "gzip"')
        elif not isinstance(value, bool):
            raise ValidationError(f"options.{name}", "expected true or false")
        options[name] = value
    return options


def parse_request_body(body: object) -> tuple[OrderFilters, dict[str, Any]]:
    if not isinstance(body, dict):
        raise ValidationError("body", "expected a JSON object")
    unknown = set(body) - set(wire.ExportRequest.model_fields)
    if unknown:
        raise ValidationError(sorted(unknown)[0], "unknown field")
    return parse_filter_object(body.get("filters")), parse_options(body.get("options"))


def _existing(
    session: Session, user: User, account: Account, digest: str, key: str | None
) -> ExportJob | None:
    if key is not None:
        replay = session.scalar(
            select(ExportJob).where(
                ExportJob.requested_by == user.id, ExportJob.idempotency_key == key
            )
        )
        if replay is not None:
            if replay.account_id != account.id or replay.filters_digest != digest:
                raise Conflict("Idempotency-Key was already used for a different export request")
            return replay
    return session.scalar(
        select(ExportJob).where(
            ExportJob.requested_by == user.id,
            ExportJob.account_id == account.id,
            ExportJob.filters_digest == digest,
            ExportJob.state.in_(lifecycle.ACTIVE),
        )
    )


def _check_active_cap(session: Session, *, settings: Settings, user: User) -> None:
    if lifecycle.count_active(session, user_id=user.id) >= settings.export_max_active_per_user:
        raise TooManyActiveExports(
            f"you already have {settings.export_max_active_per_user} exports queued or running",
            retry_after=ACTIVE_CAP_RETRY_AFTER,
        )


#: The window of EXPORT_MAX_INLINE_PER_MINUTE (seconds).
INLINE_WINDOW_SECONDS = 60


def _check_inline_rate(session: Session, *, settings: Settings, user: User) -> None:
    """Exports made inside requests (``enqueued_at`` never set) in the last minute, per user.
    Runs under the user-row lock, so a burst cannot get past it."""
    since = func.now() - dt.timedelta(seconds=INLINE_WINDOW_SECONDS)
    recent = (
        ExportJob.requested_by == user.id,
        ExportJob.enqueued_at.is_(None),
        ExportJob.created_at > since,
    )
    count, oldest = session.execute(
        select(func.count(), func.min(ExportJob.created_at)).where(*recent)
    ).one()
    limit = settings.export_max_inline_per_minute
    if count >= limit:
        now = session.scalar(select(func.now()))
        assert oldest is not None and now is not None
        left = INLINE_WINDOW_SECONDS - (now - oldest).total_seconds()
        raise TooManyInlineExports(
            f"you started {limit} exports in the last minute; try again shortly",
            retry_after=max(1, min(INLINE_WINDOW_SECONDS, math.ceil(left))),
        )


def _request_size(
    session: Session, account: Account, filters: OrderFilters, *, settings: Settings
) -> int:
    """The request's rows, exact up to the count budget, ``budget + 1`` meaning "more"; more
    than EXPORT_MAX_ROWS raises TooManyRows.

    The planner's estimate comes first: a request on a big account then skips the bounded count
    (reading up to ``budget`` rows, most of a request's time). A wrong estimate can only send an
    export to the normal lane and the workers instead of the fast lane or the request; above the
    budget the row cap is the estimate's either way, and the worker enforces it exactly."""
    budget = count_budget(settings)
    size = size_of(
        filters,
        bound=budget,
        estimate=lambda: estimate_rows(session, account, filters),
        count=lambda bound: count_rows(session, account, filters, bound=bound),
    )
    rows, estimate = size.rows, size.estimate
    if rows > settings.export_max_rows or (
        estimate is not None and rows > budget and estimate > settings.export_max_rows
    ):
        raise TooManyRows(
            f"this export would have more than {settings.export_max_rows:,} rows; "
            "narrow the filters (the file would never be cut short)"
        )
    return rows


def request_export(
    session: Session,
    *,
    settings: Settings,
    flags: FlagCache,
    user: User,
    slug: str,
    body: object,
    idempotency_key: str | None,
) -> Requested:
    """Validate and record an export request (the caller commits).

    Order of checks: admin of the account (404 / 403), switch on (503), valid input (422),
    idempotent replay or duplicate in flight (existing export), per-user cap (429), row cap
    (422), and for a small export made in the request EXPORT_MAX_INLINE_PER_MINUTE (429).
    """
    account, _ = account_for(session, slug, user, admin=True)
    if not flags.get("exports_enabled"):
        raise ExportsDisabled("exports are switched off for now; completed files stay downloadable")
    filters, options = parse_request_body(body)
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        raise ValidationError("Idempotency-Key", f"1 to {MAX_IDEMPOTENCY_KEY} characters")
    digest = request_digest(filters, options)

    # Serialise this user's requests: the cap and the duplicate check see each other's writes.
    session.execute(select(User.id).where(User.id == user.id).with_for_update())
    existing = _existing(session, user, account, digest, idempotency_key)
    if existing is not None:
        return Requested(existing, Disposition.IN_FLIGHT, inline=False, account=account)
    _check_active_cap(session, settings=settings, user=user)

    threshold = settings.export_async_threshold_rows
    rows = _request_size(session, account, filters, settings=settings)
    inline = rows <= threshold
    if inline:
        _check_inline_rate(session, settings=settings, user=user)
    job = ExportJob(
        account_id=account.id,
        requested_by=user.id,
        state=ExportState.QUEUED,
        filters=filters.to_snapshot(),
        filters_digest=digest,
        column_set_version=COLUMN_SET_VERSION,
        timezone=account.timezone,
        utf8_bom=options["utf8_bom"],
        compression=options["compression"],
        idempotency_key=idempotency_key,
        max_attempts=settings.export_max_attempts,
        enqueued_at=None if inline else func.now(),
    )
    try:
        lane = lane_for(rows, settings=settings)
        lifecycle.request(session, job, actor=f"user:{user.id}", inline=inline, lane=lane)
    except IntegrityError:  # a concurrent identical request won the race
        existing = _existing(session, user, account, digest, idempotency_key)
        if existing is None:
            raise
        return Requested(existing, Disposition.IN_FLIGHT, inline=False, account=account)
    return Requested(job, Disposition.QUEUED, inline=inline, account=account)


def make_small_export(
    sessions: sessionmaker[Session], runner: ExportRunner, job_id: uuid.UUID
) -> Disposition:
    """Make a small export now, inside the request: MADE when ready, QUEUED when a transient
    failure handed it to the workers; a final failure (or the database going away meanwhile)
    raises :class:`InlineExportFailed` with the safe reason."""
    try:
        result = runner.run(job_id, inline=True)
        if result.outcome is RunOutcome.RETRY:  # e.g. a storage blip: let the workers finish it
            with transaction(sessions) as session:
                lifecycle.send_to_workers(session, session.get_one(ExportJob, job_id))
            return Disposition.QUEUED
        if result.outcome is not RunOutcome.FAILED:
            return Disposition.MADE
        with sessions() as session:
            failed = session.get_one(ExportJob, job_id)
            reason, message = failed.error_code, failed.error_message
    except OrdersExportError:
        raise
    except Exception as exc:  # the database (or storage) went away in the middle
        log.warning("inline export %s: %s", job_id, type(exc).__name__)
        reason, message = "unavailable", None
    raise InlineExportFailed(
        message or "The export could not be made right now. Please try again in a few minutes.",
        export_id=str(job_id),
        reason=reason,
    )


@dataclass(frozen=True)
class Created:
    """What an export request came to: the export (as it is now), its account, and whether it
    was already in flight, made inside the request or queued for the workers."""

    job: ExportJob
    account: Account
    disposition: Disposition


def create_export(
    sessions: sessionmaker[Session],
    runner: ExportRunner,
    record: Callable[[Session], Requested],
) -> Created:
    """The export request use case: record it (``record``: :func:`request_export` with the
    request's arguments bound; committed here), then make a small one at once
    (:func:`make_small_export`: MADE, or QUEUED when a transient failure handed it to the
    workers). An identical export already in flight is returned as it is."""
    with sessions() as session:
        with session.begin():
            requested = record(session)
        job, account, disposition = requested.job, requested.account, requested.disposition
        if not requested.inline:  # as inserted: its server defaults came back with the INSERT
            return Created(job, account, disposition)
        disposition = make_small_export(sessions, runner, job.id)
        job = session.get_one(ExportJob, job.id, populate_existing=True)
        return Created(job, account, disposition)


def get_for_admin(session: Session, export_id: str, user: User) -> tuple[ExportJob, Account]:
    """The export, if the user is an admin of its account right now (else NotFound)."""
    job, account, role = export_for(session, export_id, user)
    if role is not Role.ADMIN:
        raise NotFound("no such export")
    return job, account


def get_for_management(session: Session, export_id: str, user: User) -> tuple[ExportJob, Account]:
    """The export, if the user is an admin of its account right now: members get Forbidden,
    everyone else NotFound (deleting the file, reading the download audit)."""
    job, account, role = export_for(session, export_id, user)
    if role is not Role.ADMIN:
        raise Forbidden("only account admins may do this")
    return job, account


def list_for_account(
    session: Session, slug: str, user: User, *, limit: int = 50
) -> tuple[Account, list[ExportJob]]:
    account, _ = account_for(session, slug, user, admin=True)
    found = session.scalars(
        select(ExportJob)
        .where(ExportJob.account_id == account.id)
        .order_by(ExportJob.created_at.desc(), ExportJob.id.desc())
        .limit(limit)
    )
    return account, list(found)


def retry(
    session: Session, *, settings: Settings, flags: FlagCache, export_id: str, user: User
) -> ExportJob:
    job, _ = get_for_admin(session, export_id, user)
    check_retryable(job, exports_enabled=flags.get("exports_enabled"))
    # The same per-user lock request_export takes: concurrent retries see each other's writes,
    # so together they cannot exceed the cap.
    session.execute(select(User.id).where(User.id == user.id).with_for_update())
    _check_active_cap(session, settings=settings, user=user)
    return requeue(
        session, settings=settings, job=job, actor=f"user:{user.id}", requested_by=user.id
    )


def check_retryable(job: ExportJob, *, exports_enabled: bool) -> None:
    """The rule for every retry, by a user or by support: switch on, a retryable state."""
    if not exports_enabled:
        raise ExportsDisabled("exports are switched off for now")
    if job.state not in lifecycle.RETRYABLE_FROM:
        raise Conflict(
            f"only failed, canceled or expired exports can be retried (this one is {job.state})"
        )


def requeue(
    session: Session, *, settings: Settings, job: ExportJob, actor: str, requested_by: int
) -> ExportJob:
    """Put a checked export back in the queue (the caller ran :func:`check_retryable`)."""
    try:
        with session.begin_nested():
            moved = lifecycle.retry(
                session, job, actor=actor, requested_by=requested_by,
                max_attempts=settings.export_max_attempts,
            )  # fmt: skip
    except IntegrityError:  # the unique in-flight index: an identical export is running
        raise Conflict("an identical export of yours is already queued or running") from None
    if moved is None:
        raise Conflict("the export changed state; reload and try again")
    return moved


def cancel(session: Session, *, export_id: str, user: User) -> ExportJob:
    job, _ = get_for_admin(session, export_id, user)
    return cancel_job(session, job=job, actor=f"user:{user.id}")


def cancel_job(session: Session, *, job: ExportJob, actor: str) -> ExportJob:
    """The rule for every cancel, by a user or by support: only queued or running exports."""
    moved = lifecycle.cancel(session, job, actor=actor)
    if moved is None:
        raise Conflict(f"only queued or running exports can be canceled (this one is {job.state})")
    return moved


def delete_file(
    session: Session, storage: Storage, *, job: ExportJob, actor: str, deleted_by: int | None
) -> ExportJob:
    """ready -> expired at once: delete the stored object, then record who deleted it.

    The object is deleted before the transition and outside any row lock (a slow storage call
    must not hold the job row); a concurrent delete or expiry makes the transition lose the race
    and the caller gets a Conflict, the object being gone either way. The caller commits.
    """
    if job.state is not ExportState.READY:
        raise Conflict(f"only ready exports have a file to delete (this one is {job.state})")
    if job.storage_key:
        storage.delete(job.storage_key)
    who = session.get(User, deleted_by) if deleted_by is not None else None
    moved = lifecycle.delete_file(
        session, job, actor=actor, deleted_by=deleted_by,
        deleted_by_name=who.display_name if who is not None else SUPPORT_NAME,
    )  # fmt: skip
    if moved is None:
        raise Conflict("the export changed state; reload and try again")
    return moved


def link_expiry(settings: Settings, job: ExportJob) -> dt.datetime:
    """A link lives EXPORT_LINK_TTL_SECONDS, never beyond the file's own expiry."""
    assert job.expires_at is not None
    ttl = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=settings.export_link_ttl_seconds)
    return min(ttl, job.expires_at)


def to_json(
    job: ExportJob, *, account: Account, settings: Settings, viewer: User, base_url: str
) -> dict[str, Any]:
    """The ``<Export>`` object of the HTTP contract, with a download link for ``viewer``.

    ``base_url`` prefixes the link when PUBLIC_URL is not set (the request's own origin).
    """
    estimate = job.rows_estimate
    if job.state is ExportState.READY:
        percent: float | None = 100.0
    elif estimate:
        # The total of a big export is the planner's estimate: never claim 100% before ready.
        percent = round(min(99.9, 100.0 * job.rows_written / estimate), 1)
    else:
        percent = 0.0 if job.state in lifecycle.ACTIVE else None
    now = dt.datetime.now(dt.UTC)
    downloadable = (
        job.state is ExportState.READY and job.expires_at is not None and job.expires_at > now
    )
    download_url = None
    if downloadable:
        path = download_path(
            SigningKeys.from_settings(settings),
            export_id=str(job.id),
            user_id=viewer.id,
            expires_at=link_expiry(settings, job),
        )
        download_url = (settings.public_url or base_url).rstrip("/") + path
    error = None
    if job.error_code and job.state in (ExportState.FAILED, ExportState.QUEUED):
        error = wire.ExportError(
            code=job.error_code,
            message=job.error_message or "",
            retryable=job.error_class is ErrorClass.RETRYABLE,
        )
    file = None
    if job.state is ExportState.READY and job.file_name:
        file = wire.ExportFile(
            name=job.file_name, size_bytes=job.size_bytes or 0, sha256=job.sha256 or ""
        )
    deleted = None
    if job.state is ExportState.EXPIRED and job.file_deleted_at is not None:
        deleted = wire.Deleted(at=job.file_deleted_at, by=job.file_deleted_by or SUPPORT_NAME)
    return wire.Export(
        id=job.id,
        account=account.slug,
        state=job.state,
        filters=wire.Filters.model_validate(job.filters),
        row_count=job.row_count,
        progress=wire.Progress(
            rows_written=job.rows_written, rows_estimate=estimate, percent=percent
        ),
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        expires_at=job.expires_at,
        error=error,
        download_url=download_url,
        file=file,
        verdict=support.diagnose(job, now=now).verdict,
        options=wire.ExportOptions.model_validate(job_options(job)),
        deleted=deleted,
    ).to_json()
