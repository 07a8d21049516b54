"""Periodic housekeeping: rescue jobs of dead workers, delete the files of dead or canceled
attempts, expire old files, resend lost work, prune what unauthenticated requests leave behind.

The five steps are independent: each runs in a thread of its own with its own error handling,
so a slow or failing step (storage unreachable: ~9 s per delete; Redis down) never holds up the
others, and no storage call happens inside a transaction that holds row locks."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from redis.exceptions import RedisError
from sqlalchemy.orm import Session, sessionmaker

from services.worker.actors import Actors
from shared import lifecycle, retention
from shared.db import transaction
from shared.errors import StorageError
from shared.settings import Settings
from shared.storage import Storage

log = logging.getLogger(__name__)

#: Pause between housekeeping rounds (seconds).
INTERVAL_SECONDS = 2.0
#: Pruning of login failures, sessions and the download audit runs at most this often (seconds).
PRUNE_INTERVAL_SECONDS = 60.0


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

    def _steps(self) -> dict[str, Callable[[], int]]:
        return {
            "rescue": self.rescue,
            "sweep": self.sweep,
            "expire": self.expire,
            "resend": self.resend,
            "prune": self.prune,
        }

    def run(self, stop: threading.Event) -> None:
        """Each step in its own thread, every INTERVAL_SECONDS, until ``stop`` is set."""
        threads = [
            threading.Thread(
                target=self._repeat,
                args=(name, step, stop),
                name=f"maintenance-{name}",
                daemon=True,
            )
            for name, step in self._steps().items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _repeat(self, name: str, step: Callable[[], int], stop: threading.Event) -> None:
        while not stop.wait(INTERVAL_SECONDS):
            self._guarded(name, step)

    @staticmethod
    def _guarded(name: str, step: Callable[[], int]) -> None:
        try:
            step()
        except Exception:  # keep housekeeping alive through database, storage or Redis blips
            log.exception("maintenance: %s failed; trying again in %ss", name, INTERVAL_SECONDS)

    def round(self) -> None:
        """One pass of every step (tests, and a manual run); a failing step stops no other."""
        for name, step in self._steps().items():
            self._guarded(name, step)

    def prune(self) -> int:
        """Retention (shared/retention.py), once per PRUNE_INTERVAL_SECONDS at most; rows gone."""
        now = time.monotonic()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_INTERVAL_SECONDS:
            return 0
        self._pruned_at = now
        with transaction(self._sessions) as session:
            pruned = retention.prune(session, self._settings)
        if any(vars(pruned).values()):
            log.info("pruned %s", pruned)
        return sum(vars(pruned).values())

    def rescue(self) -> int:
        """Running jobs whose lease expired go back to the queue, or fail when out of attempts
        (the lost attempt's file is recorded as a stray in the same transaction: ``sweep``)."""
        requeue: list[uuid.UUID] = []
        with transaction(self._sessions) as session:
            for job in lifecycle.lease_expired(session):
                moved, retry = lifecycle.rescue(session, job)
                if moved is not None and retry:
                    requeue.append(job.id)
        for export_id in requeue:
            log.warning("export %s: worker lost, back in the queue", export_id)
            try:
                self._actors.send_generate(str(export_id))
            except RedisError as exc:  # queued in PostgreSQL: resend() sends it later
                log.warning("export %s: work not sent (%s)", export_id, type(exc).__name__)
        return len(requeue)

    def sweep(self) -> int:
        """Delete the files no export may point to (``stray_objects``: dead or canceled
        attempts' files), each outside any transaction; a row goes once its file is gone, so
        storage being away only postpones it (the round stops at the first failure)."""
        with transaction(self._sessions) as session:
            due = [(stray.key, stray.export_id) for stray in lifecycle.strays(session)]
        deleted: list[str] = []
        for key, export_id in due:
            try:
                self._storage.delete(key)
            except StorageError:
                log.warning("export %s: a stray file was not deleted; will try again", export_id)
                break
            deleted.append(key)
        if deleted:
            with transaction(self._sessions) as session:
                lifecycle.forget_strays(session, deleted)
        return len(deleted)

    def expire(self) -> int:
        """Delete files past their expiry and mark their exports expired.

        The rows are only read under lock (SKIP LOCKED, released at once); each object is
        deleted outside any transaction, then its job moves ready -> expired conditionally. A
        file is deleted only once it is past its expiry, so losing that race to another
        housekeeper or a user's delete is harmless.
        """
        with transaction(self._sessions) as session:
            due = [(job.id, job.storage_key) for job in lifecycle.past_expiry(session)]
        expired = 0
        for export_id, key in due:
            if key:
                try:
                    self._storage.delete(key)
                except StorageError:
                    log.warning("export %s: file delete failed; will try again", export_id)
                    continue
            with transaction(self._sessions) as session:
                if lifecycle.expire(session, export_id) is not None:
                    expired += 1
        return expired

    def resend(self) -> int:
        """Queued jobs whose message was lost (e.g. Redis restarted without it) are sent again."""
        # Jobs whose message is still in Redis (waiting for a free worker thread, or held by a
        # worker's consumer for one) are not lost: sending them again would only pile up work.
        waiting = self._actors.waiting_export_ids()
        with transaction(self._sessions) as session:
            stale = lifecycle.stale_queued(
                session, older_than_seconds=self._settings.export_requeue_after_seconds
            )
            ids = [str(job.id) for job in stale if str(job.id) not in waiting]
            lifecycle.mark_enqueued(session, [uuid.UUID(export_id) for export_id in ids])
        for export_id in ids:
            log.warning(
                "export %s: queued for long without a worker message; sending again", export_id
            )
            self._actors.send_generate(export_id)
        return len(ids)
