"""Periodic housekeeping: rescue jobs of dead workers, expire old files, resend lost work, prune
what unauthenticated requests leave behind."""

from __future__ import annotations

import logging
import threading
import time
import uuid

from sqlalchemy import func
from sqlalchemy.orm import Session, sessionmaker

from services.worker.actors import Actors
from shared import jobs, metrics, outbox, retention
from shared.db import transaction
from shared.errors import StorageError
from shared.events import ExportExpired, ExportFailed
from shared.models import Account, ErrorClass, ExportState
from shared.settings import Settings
from shared.storage import Storage

log = logging.getLogger(__name__)

#: Pause between housekeeping rounds (seconds).
INTERVAL_SECONDS = 2.0
#: Pruning of login failures, sessions and the download audit runs at most this often (seconds).
PRUNE_INTERVAL_SECONDS = 60.0
#: Safe error recorded when a worker vanished mid-export.
WORKER_LOST = ("worker_lost", "The export worker stopped unexpectedly.")


class Maintenance:
    """One round at a time; several processes may run it (rows are locked SKIP LOCKED)."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        storage: Storage,
        actors: Actors,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._storage = storage
        self._actors = actors
        self._pruned_at: float | None = None

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(INTERVAL_SECONDS):
            try:
                self.round()
            except Exception:  # keep housekeeping alive through database or storage blips
                log.exception("maintenance round failed; next round in %ss", INTERVAL_SECONDS)

    def round(self) -> None:
        self.rescue()
        self.expire()
        self.resend()
        self.prune()

    def prune(self) -> None:
        """Retention (shared/retention.py), at most once per PRUNE_INTERVAL_SECONDS."""
        now = time.monotonic()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_INTERVAL_SECONDS:
            return
        self._pruned_at = now
        with transaction(self._sessions) as session:
            pruned = retention.prune(session, self._settings)
        if any(vars(pruned).values()):
            log.info("pruned %s", pruned)

    def rescue(self) -> int:
        """Running jobs whose lease expired go back to the queue, or fail when out of attempts."""
        requeue: list[uuid.UUID] = []
        lost = 0
        with transaction(self._sessions) as session:
            for job in jobs.lease_expired(session):
                retry = job.attempts < job.max_attempts
                code, message = WORKER_LOST
                moved = jobs.transition(
                    session,
                    job.id,
                    to=ExportState.QUEUED if retry else ExportState.FAILED,
                    expected=[ExportState.RUNNING],
                    actor="system:rescuer",
                    detail="lease_expired",
                    error_code=code,
                    error_message=message + (" It will be retried." if retry else ""),
                    error_class=ErrorClass.RETRYABLE,
                    worker_id=None,
                    lease_expires_at=None,
                    **({"enqueued_at": func.now()} if retry else {"finished_at": func.now()}),
                )
                if moved is None:
                    continue
                lost += 1
                account = session.get_one(Account, job.account_id)
                outbox.add(
                    session,
                    ExportFailed(
                        export_id=str(job.id), account=account.slug, requested_by=job.requested_by,
                        code=code, message=message, retryable=True, final=not retry,
                    ),
                )  # fmt: skip
                if retry:
                    requeue.append(job.id)
        if lost:
            metrics.FAILURES.labels(WORKER_LOST[0]).inc(lost)
            metrics.RETRIES.inc(len(requeue))
        for export_id in requeue:
            log.warning("export %s: worker lost, back in the queue", export_id)
            self._actors.send_generate(str(export_id))
        return len(requeue)

    def expire(self) -> int:
        """Delete files past their expiry and mark their exports expired."""
        expired = 0
        with transaction(self._sessions) as session:
            for job in jobs.past_expiry(session):
                if job.storage_key:
                    try:
                        self._storage.delete(job.storage_key)
                    except StorageError:
                        log.warning("export %s: file delete failed; will try again", job.id)
                        continue
                moved = jobs.transition(
                    session, job.id, to=ExportState.EXPIRED, expected=[ExportState.READY],
                    actor="system:expiry", storage_key=None,
                )  # fmt: skip
                if moved is not None:
                    account = session.get_one(Account, job.account_id)
                    outbox.add(session, ExportExpired(export_id=str(job.id), account=account.slug))
                    expired += 1
        return expired

    def resend(self) -> int:
        """Queued jobs whose message was lost (e.g. Redis restarted without it) are sent again."""
        with transaction(self._sessions) as session:
            stale = jobs.stale_queued(
                session, older_than_seconds=self._settings.export_requeue_after_seconds
            )
            jobs.mark_enqueued(session, [job.id for job in stale])
            ids = [str(job.id) for job in stale]
        for export_id in ids:
            log.warning(
                "export %s: queued for long without a worker message; sending again", export_id
            )
            self._actors.send_generate(export_id)
        return len(ids)
