"""Download authorization: link signature and expiry, and the caller's role *right now*."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared import metrics
from shared.access import export_for
from shared.errors import (
    BadSignature,
    FileExpired,
    Forbidden,
    LinkExpired,
    NotFound,
    OrdersExportError,
    Unauthenticated,
)
from shared.models import Account, DownloadAttempt, ExportJob, ExportState, Role, User
from shared.signing import SigningKeys, verify

#: Attempts listed by ``GET /api/v1/order-exports/{id}/downloads``, newest first (count).
AUDIT_LIST_SIZE = 500


class DownloadOutcome(enum.StrEnum):
    """Label values of ``orders_export_downloads_total{outcome}`` and of the audit trail."""

    OK = "ok"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    BAD_SIGNATURE = "bad_signature"
    LINK_EXPIRED = "link_expired"
    FILE_EXPIRED = "file_expired"


def declare_metrics() -> None:
    """Every outcome's series at zero (see :func:`shared.metrics.declare`)."""
    metrics.declare(metrics.DOWNLOADS, *((outcome.value,) for outcome in DownloadOutcome))


def outcome_of(exc: OrdersExportError) -> DownloadOutcome:
    """The audit outcome for a refused download."""
    for cls, outcome in (
        (BadSignature, DownloadOutcome.BAD_SIGNATURE),
        (Forbidden, DownloadOutcome.FORBIDDEN),
        (Unauthenticated, DownloadOutcome.UNAUTHENTICATED),
        (LinkExpired, DownloadOutcome.LINK_EXPIRED),
        (FileExpired, DownloadOutcome.FILE_EXPIRED),
    ):
        if isinstance(exc, cls):
            return outcome
    return DownloadOutcome.NOT_FOUND


def authorize(
    session: Session, *, keys: SigningKeys, export_id: str, user: User, expires: str, signature: str
) -> tuple[ExportJob, Account]:
    """The export and account if ``user`` may download it now; otherwise a domain error.

    Checks, in order: the export exists and the user is a member of its account (else 404,
    revealing nothing), is an admin (403), the signature is genuine for this user (403), the link
    has not expired (410), the file has not expired (410), and the file is ready (404).
    """
    job, account, role = export_for(session, export_id, user)
    if role is not Role.ADMIN:
        raise Forbidden("only account admins may download exports")
    verify(keys, export_id=str(job.id), user_id=user.id, expires=expires, signature=signature)
    now = dt.datetime.now(dt.UTC)
    if job.state is ExportState.EXPIRED or (
        job.state is ExportState.READY and job.expires_at is not None and job.expires_at <= now
    ):
        raise FileExpired("this export's file has expired; export again for a fresh file")
    if job.state is not ExportState.READY or job.storage_key is None:
        raise NotFound("this export has no file")
    return job, account


def record(
    session: Session,
    *,
    export_id: str,
    user_id: int | None,
    outcome: DownloadOutcome,
    client_ip: str | None,
    byte_range: str | None = None,
    redirect: bool = False,
) -> None:
    """Append one attempt to the audit trail (``download_attempts``) and count it.

    ``byte_range`` is the range served (``A-B``) when the request was ranged; ``redirect`` says
    the caller was sent to storage with a presigned URL.
    """
    try:
        key: uuid.UUID | None = uuid.UUID(export_id)
    except ValueError:
        key = None
    session.add(
        DownloadAttempt(
            export_id=key,
            user_id=user_id,
            outcome=outcome.value,
            client_ip=client_ip,
            byte_range=byte_range,
            redirect=redirect,
        )
    )
    metrics.DOWNLOADS.labels(outcome.value).inc()


def recent(
    session: Session, export_id: uuid.UUID, *, limit: int = AUDIT_LIST_SIZE
) -> list[dict[str, Any]]:
    """The export's latest download attempts, newest first, as the HTTP contract shows them."""
    rows = session.execute(
        select(DownloadAttempt, User.email)
        .outerjoin(User, User.id == DownloadAttempt.user_id)
        .where(DownloadAttempt.export_id == export_id)
        .order_by(DownloadAttempt.at.desc(), DownloadAttempt.id.desc())
        .limit(limit)
    )
    return [
        {
            "at": attempt.at.isoformat(),
            "user": (
                {"id": attempt.user_id, "email": email}
                if attempt.user_id is not None and email is not None
                else None
            ),
            "outcome": attempt.outcome,
            "client_ip": attempt.client_ip,
            "bytes": attempt.byte_range,
            "redirect": attempt.redirect,
        }
        for attempt, email in rows
    ]
