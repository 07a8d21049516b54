"""Runs one export: claim, count, COPY into storage, then ready / retry / failed.

Used by the Dramatiq actor (background exports) and by the API for small exports made inside
the request. PostgreSQL decides who owns a job; storage never shows a partial file.
"""

from __future__ import annotations

import datetime as dt
import enum
import io
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from dramatiq.middleware import Shutdown
from psycopg_pool import ConnectionPool
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared import lifecycle, metrics
from shared.csvfile import CopyStream, CsvFile, ExportQuery, Throttled
from shared.db import libpq_url, transaction
from shared.errors import StorageError, TooManyRows
from shared.failures import classify
from shared.filters import from_snapshot
from shared.flags import FlagCache
from shared.models import Account, ErrorClass, ExportJob, ExportState
from shared.settings import Settings
from shared.storage import Storage, new_object_key

log = logging.getLogger(__name__)

#: Up to this many rows the progress total is an exact count; beyond, the planner's estimate.
EXACT_COUNT_UP_TO = 100_000
#: How often a running export renews its lease and records progress (seconds; spec: <= 2).
HEARTBEAT_SECONDS = 1.0


class RunOutcome(enum.Enum):
    """What happened to one attempt at running an export."""

    READY = "ready"
    RETRY = "retry"  # failed, back in the queue; run again after ``Result.delay_seconds``
    FAILED = "failed"
    CANCELED = "canceled"
    BUSY = "busy"  # another export of the account is running; try again shortly
    PAUSED = "paused"  # workers_paused is on
    SKIPPED = "skipped"  # not queued any more (done, canceled, or claimed by someone else)
    HANDED_BACK = "handed_back"  # the worker is stopping: back to queued, the attempt not counted
    DRAINING = "draining"  # the worker is stopping: not claimed; send the work again


#: Outcomes of a run that got as far as a claim (label values of the duration histogram).
RUN_OUTCOMES = (
    RunOutcome.READY,
    RunOutcome.FAILED,
    RunOutcome.RETRY,
    RunOutcome.CANCELED,
    RunOutcome.HANDED_BACK,
)


@dataclass(frozen=True)
class Result:
    outcome: RunOutcome
    delay_seconds: float = 0.0


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Heartbeat(threading.Thread):
    """Renews the lease while the export makes progress and writes progress; cancels the COPY
    when the job is taken away or the worker is stopping.

    The lease follows real progress, not just a live thread: it is renewed to ``lease_seconds``
    after the last time rows moved (or a phase began), so an attempt stuck on a socket (a
    database host that vanished silently) lets its lease lapse and housekeeping requeues the job.
    """

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        job: ExportJob,
        worker_id: str,
        lease_seconds: int,
        query: ExportQuery,
        hand_back: threading.Event,
    ) -> None:
        super().__init__(name=f"heartbeat-{job.id}", daemon=True)
        self._sessions = sessions
        self._job_id = job.id
        self._worker_id = worker_id
        self._lease_seconds = lease_seconds
        self._query = query
        self._hand_back = hand_back
        self._stop_event = threading.Event()
        self._progress = (-1, -1)
        self._progress_at = time.monotonic()
        self.rows_estimate: int | None = None
        self.lost = False
        self.handing_back = False

    def _idle_seconds(self) -> float:
        """Seconds since rows last moved (or the estimate arrived)."""
        progress = (self._query.rows_written, -1 if self.rows_estimate is None else 0)
        now = time.monotonic()
        if progress != self._progress:
            self._progress, self._progress_at = progress, now
        return now - self._progress_at

    def run(self) -> None:
        while not self._stop_event.wait(HEARTBEAT_SECONDS):
            if self._hand_back.is_set():
                log.info("export %s: the worker is stopping; handing it back", self._job_id)
                self.handing_back = True
                self._query.cancel()
                return
            remaining = self._lease_seconds - self._idle_seconds()
            if remaining <= 0:
                continue  # no progress for a whole lease: let it lapse (housekeeping requeues)
            try:
                with transaction(self._sessions) as session:
                    ours = lifecycle.heartbeat(
                        session,
                        self._job_id,
                        worker_id=self._worker_id,
                        lease_seconds=remaining,
                        rows_written=self._query.rows_written,
                        rows_estimate=self.rows_estimate,
                    )
            except Exception:  # the database may be briefly away; the lease covers that
                log.warning("heartbeat for export %s failed; will try again", self._job_id)
                continue
            if not ours:
                log.info(
                    "export %s is no longer ours (canceled or rescued); stopping it", self._job_id
                )
                self.lost = True
                self._query.cancel()
                return

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()


class _Lost(Exception):
    """The job was canceled or rescued while this attempt ran."""


class _HandBack(Exception):
    """The worker is stopping and the grace period is over."""


class ExportRunner:
    """Runs exports for one process; safe to call from several threads."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        storage: Storage,
        flags: FlagCache,
        inline_pool: ConnectionPool[psycopg.Connection[Any]] | None = None,
    ) -> None:
        self._settings = settings
        #: Export connections of inline exports (the API's); workers connect per export.
        self._inline_pool = inline_pool
        self._sessions = sessions
        self._storage = storage
        self._flags = flags
        self._export_database_url = libpq_url(settings.export_database_url or settings.database_url)
        #: Set on SIGTERM: nothing new is claimed.
        self._draining = threading.Event()
        #: Set when the shutdown grace is over: running exports are handed back to the queue.
        self._hand_back = threading.Event()
        metrics.declare(metrics.JOB_DURATION, *((outcome.value,) for outcome in RUN_OUTCOMES))

    def drain(self, *, grace_seconds: float) -> threading.Timer:
        """Stop claiming now; hand running exports back after ``grace_seconds``."""
        self._draining.set()
        timer = threading.Timer(grace_seconds, self._hand_back.set)
        timer.daemon = True
        timer.start()
        return timer

    def run(self, export_id: uuid.UUID, *, inline: bool = False) -> Result:
        """One attempt at the export. ``inline`` exports skip the queue rules and the email.

        Every exit path (any exception, Dramatiq's ``TimeLimitExceeded`` and ``Shutdown``,
        interpreter exit) stops the heartbeat and records a classified outcome.
        """
        if not inline and self._draining.is_set():
            return Result(RunOutcome.DRAINING)  # not claimed: the actor sends the work again
        if not inline and self._flags.get("workers_paused"):
            return Result(RunOutcome.PAUSED)
        worker_id = new_worker_id()
        with transaction(self._sessions) as session:
            job = lifecycle.claim(
                session,
                export_id,
                worker_id=worker_id,
                lease_seconds=self._settings.export_lease_seconds,
                attempt_key=lambda account_id: new_object_key(
                    account_id=account_id, export_id=str(export_id)
                ),
                exclusive_per_account=not inline,
            )
            if job is None:
                state = session.scalar(select(ExportJob.state).where(ExportJob.id == export_id))
                return Result(
                    RunOutcome.BUSY if state is ExportState.QUEUED else RunOutcome.SKIPPED
                )
            account = session.get_one(Account, job.account_id)
        if inline:  # made inside a request: no queue, and not a worker's run
            return self._attempt(job, account, worker_id=worker_id, inline=inline)
        started = time.monotonic()
        result = self._attempt(job, account, worker_id=worker_id, inline=inline)
        metrics.JOB_DURATION.labels(result.outcome.value).observe(time.monotonic() - started)
        return result

    def _attempt(self, job: ExportJob, account: Account, *, worker_id: str, inline: bool) -> Result:
        """Generate, then finish; whatever happens, end with a recorded outcome."""
        key = job.attempt_key
        assert key is not None  # recorded by the claim
        reraise: BaseException | None = None
        try:
            try:
                csv_file = self._generate(job, account, worker_id=worker_id, key=key, inline=inline)
            except _Lost:
                self._discard(job.id, key)
                return Result(RunOutcome.CANCELED)
            except (_HandBack, Shutdown) as exc:
                return self._give_back(job, account, worker_id=worker_id, key=key, cause=exc)
            except (KeyboardInterrupt, SystemExit) as exc:  # the interpreter is exiting
                reraise = exc
                return self._give_back(job, account, worker_id=worker_id, key=key, cause=exc)
            except BaseException as exc:
                return self._fail(job, account, exc, worker_id=worker_id, key=key, inline=inline)
            try:
                return self._finish(
                    job, account, csv_file, worker_id=worker_id, key=key, notify=not inline
                )
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    reraise = exc
                return self._fail(job, account, exc, worker_id=worker_id, key=key, inline=inline)
        finally:
            if reraise is not None:
                raise reraise

    def close(self) -> None:
        """Close the inline exports' connection pool, if any (the API at shutdown)."""
        if self._inline_pool is not None:
            self._inline_pool.close()

    def _generate(
        self, job: ExportJob, account: Account, *, worker_id: str, key: str, inline: bool
    ) -> CsvFile:
        """Connect, estimate and COPY into storage (raises on any failure)."""
        filters = from_snapshot(job.filters)
        limit = self._settings.export_max_rows
        with ExportQuery(
            database_url=self._export_database_url,
            statement_timeout_seconds=self._settings.export_statement_timeout_seconds,
            pool=self._inline_pool if inline else None,
        ) as query:
            heartbeat = Heartbeat(
                sessions=self._sessions,
                job=job,
                worker_id=worker_id,
                lease_seconds=self._settings.export_lease_seconds,
                query=query,
                hand_back=self._hand_back,
            )
            heartbeat.start()
            try:
                heartbeat.rows_estimate = query.estimate(
                    account, filters, exact_up_to=EXACT_COUNT_UP_TO
                )
                csv_file = query.stream_into(
                    account,
                    filters,
                    utf8_bom=job.utf8_bom,
                    compression=job.compression,
                    limit=limit + 1,
                    sink=lambda stream: self._store(key, stream),
                )
                if csv_file.row_count > limit:  # the COPY stops one row past the cap
                    raise TooManyRows(
                        f"The export would have more than {limit:,} rows. "
                        "Narrow the filters and try again."
                    )
            except BaseException as exc:
                heartbeat.stop()
                if heartbeat.lost:
                    raise _Lost from exc
                if heartbeat.handing_back:
                    raise _HandBack from exc
                raise
            finally:
                heartbeat.stop()
            if heartbeat.lost:
                raise _Lost
            return csv_file

    def _discard(self, job_id: uuid.UUID, key: str) -> None:
        """Remove this attempt's file, which must not stay (a failed put leaves none anyway).
        With storage away, the key is recorded for housekeeping's sweep; with the database away
        too, the bucket's lifecycle rule removes the file."""
        try:
            self._storage.delete(key)
        except StorageError:
            log.warning("export %s: could not delete %s now; housekeeping will", job_id, key)
            try:
                with transaction(self._sessions) as session:
                    lifecycle.record_stray(session, key, export_id=job_id)
            except Exception as exc:
                log.warning("export %s: stray file not recorded (%s)", job_id, type(exc).__name__)

    def _store(self, key: str, stream: CopyStream) -> None:
        source: io.RawIOBase = stream
        if self._settings.export_max_bytes_per_second:
            source = Throttled(stream, bytes_per_second=self._settings.export_max_bytes_per_second)
        try:
            self._storage.put(key, source)  # type: ignore[arg-type]
        except (StorageError, psycopg.Error):
            raise
        except OSError as exc:
            raise StorageError("storage write failed") from exc

    def _finish(
        self,
        job: ExportJob,
        account: Account,
        csv_file: CsvFile,
        *,
        worker_id: str,
        key: str,
        notify: bool,
    ) -> Result:
        expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(
            seconds=self._settings.export_file_ttl_seconds
        )
        with transaction(self._sessions) as session:
            done = lifecycle.finish(
                session,
                job,
                worker_id=worker_id,
                expires_at=expires_at,
                notify=notify,
                row_count=csv_file.row_count,
                size_bytes=csv_file.size_bytes,
                sha256=csv_file.sha256,
                storage_key=key,
                file_name=file_name(account.slug, job.created_at, job.compression),
            )
        if done is None:  # canceled or rescued while we were finishing
            self._discard(job.id, key)
            return Result(RunOutcome.CANCELED)
        return Result(RunOutcome.READY)

    def _ready_with(self, job_id: uuid.UUID, key: str) -> bool:
        """Whether the job is ready with ``key`` (a commit whose reply was lost did happen)."""
        try:
            with self._sessions() as session:
                stored = session.scalar(
                    select(ExportJob.storage_key).where(
                        ExportJob.id == job_id, ExportJob.state == ExportState.READY
                    )
                )
        except Exception:
            return True  # cannot tell: keep the file (the lifecycle rule removes strays)
        return stored == key

    def _fail(
        self,
        job: ExportJob,
        account: Account,
        exc: BaseException,
        *,
        worker_id: str,
        key: str,
        inline: bool,
    ) -> Result:
        """Record a failed attempt: back to the queue (with backoff) while attempts remain and
        the error is retryable, else failed for good. The attempt's file, if any, is deleted
        once the database says it is not the job's file. The rule and the counters are
        :func:`shared.lifecycle.fail_attempt`'s."""
        error = classify(exc, canceled_by_us=False)
        if error.error_class is ErrorClass.ENGINEERING:
            log.error("export %s failed unexpectedly", job.id, exc_info=exc)
        else:
            log.warning("export %s failed: %s (%s)", job.id, error.code, type(exc).__name__)
        try:
            with transaction(self._sessions) as session:
                moved, retry = lifecycle.fail_attempt(
                    session, job, error, worker_id=worker_id, notify=not inline
                )
        except Exception as record_exc:
            # The primary is away too: the lease lapses and housekeeping requeues the job.
            log.warning(
                "export %s: failure not recorded (%s); left to housekeeping",
                job.id,
                type(record_exc).__name__,
            )
            if not self._ready_with(job.id, key):
                self._discard(job.id, key)
            return Result(RunOutcome.RETRY, delay_seconds=self._backoff(job))
        if moved is None:
            if not self._ready_with(job.id, key):
                self._discard(job.id, key)
                return Result(RunOutcome.CANCELED)
            return Result(RunOutcome.READY)  # _finish had committed; only its reply was lost
        self._discard(job.id, key)
        if retry:
            return Result(RunOutcome.RETRY, delay_seconds=self._backoff(job))
        return Result(RunOutcome.FAILED)

    def _backoff(self, job: ExportJob) -> float:
        return float(self._settings.export_retry_backoff_seconds * 2 ** (job.attempts - 1))

    def _give_back(
        self, job: ExportJob, account: Account, *, worker_id: str, key: str, cause: BaseException
    ) -> Result:
        """running -> queued without using up the attempt (the worker is stopping); the
        ``ExportRequested`` in the same transaction gets the job a new work message."""
        log.info("export %s: handed back to the queue (%s)", job.id, type(cause).__name__)
        try:
            with transaction(self._sessions) as session:
                moved = lifecycle.hand_back(session, job, worker_id=worker_id)
        except Exception as exc:
            log.warning(
                "export %s: hand-back not recorded (%s); left to housekeeping",
                job.id,
                type(exc).__name__,
            )
            moved = None
        self._discard(job.id, key)
        return Result(RunOutcome.HANDED_BACK if moved is not None else RunOutcome.CANCELED)


def file_name(account_slug: str, created_at: dt.datetime, compression: str = "none") -> str:
    """``orders-<slug>-<YYYYMMDD-HHMM>.csv`` (UTC time of the request); ``.csv.gz`` if gzip."""
    suffix = ".csv.gz" if compression == "gzip" else ".csv"
    return f"orders-{account_slug}-{created_at.astimezone(dt.UTC):%Y%m%d-%H%M}{suffix}"
