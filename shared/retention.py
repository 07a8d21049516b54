"""Retention of what unauthenticated requests write: login failures past the throttle window,
browser sessions past their idle timeout or lifetime, and the download audit trail past
AUDIT_RETENTION_DAYS. Run by the workers' housekeeping (services/worker/maintenance.py)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from shared.identity import prune_login_failures, prune_web_sessions
from shared.models import DownloadAttempt
from shared.settings import Settings

#: Audit rows deleted per round at most (a long backlog goes over several rounds, in short
#: transactions).
AUDIT_BATCH = 10_000


@dataclass(frozen=True)
class Pruned:
    login_failures: int
    web_sessions: int
    download_attempts: int


def prune(session: Session, settings: Settings) -> Pruned:
    """Delete what no longer counts or is past its retention (the caller commits)."""
    login_failures = prune_login_failures(
        session, window_seconds=settings.login_throttle_window_seconds
    )
    web_sessions = prune_web_sessions(
        session,
        idle_seconds=settings.session_idle_seconds,
        lifetime_seconds=settings.session_lifetime_seconds,
    )
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=settings.audit_retention_days)
    old = select(DownloadAttempt.id).where(DownloadAttempt.at < cutoff).limit(AUDIT_BATCH)
    result = session.execute(delete(DownloadAttempt).where(DownloadAttempt.id.in_(old)))
    return Pruned(login_failures, web_sessions, int(result.rowcount))  # type: ignore[attr-defined]
