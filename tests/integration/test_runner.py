"""ExportRunner against real PostgreSQL and storage: progress, cancel, timeouts, failures."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from shared.db import transaction
from shared.devstack.mailsink import MailSink
from shared.events import decode
from shared.flags import FlagCache, set_flag
from shared.models import ErrorClass, ExportJob, ExportState
from shared.notifications import Notifier
from shared.runner import ExportRunner, RunOutcome
from shared.settings import Settings
from tests.support.jobs import events_of, failed_with, job_of, make_job, seeded_admin
from tests.support.storage import FaultyStorage

ORDERS = 30_000


@pytest.fixture(scope="module")
def ids(sessions: sessionmaker[Session]) -> dict[str, int]:
    slugs = ("run-a", "run-b", "run-c", "run-d", "run-e", "run-f")
    accounts = [(slug, ORDERS, 3) for slug in slugs]
    return seeded_admin(sessions, "runner@example.test", accounts, timezone="Europe/Berlin")


def files_in(storage: FaultyStorage) -> list[Path]:
    root = Path(storage.inner.root)  # type: ignore[attr-defined]
    return [p for p in root.rglob("*") if p.is_file()]


def make_runner(
    settings: Settings, sessions: sessionmaker[Session], storage: FaultyStorage, **overrides: Any
) -> ExportRunner:
    return ExportRunner(
        settings=settings.model_copy(update={"export_retry_backoff_seconds": 0.1, **overrides}),
        sessions=sessions,
        storage=storage,
        flags=FlagCache(sessions, max_age=0),
    )


def test_success_records_file_and_events(
    settings: Settings, sessions: sessionmaker[Session], storage: FaultyStorage, ids: dict[str, int]
) -> None:
    export_id = make_job(sessions, account_id=ids["run-a"], user_id=ids["user"])
    assert make_runner(settings, sessions, storage).run(export_id).outcome is RunOutcome.READY
    job = job_of(sessions, export_id)
    assert (job.state, job.row_count, job.rows_written, job.attempts) == (
        ExportState.READY,
        ORDERS,
        ORDERS,
        1,
    )
    assert job.size_bytes == sum(p.stat().st_size for p in files_in(storage))
    assert job.expires_at is not None and job.finished_at is not None
    assert (job.expires_at - job.finished_at).total_seconds() == pytest.approx(
        settings.export_file_ttl_seconds, abs=5
    )
    assert [e["type"] for e in events_of(sessions, export_id)] == ["ExportStarted", "ExportReady"]


def test_progress_is_recorded_while_running(
    settings: Settings, sessions: sessionmaker[Session], storage: FaultyStorage, ids: dict[str, int]
) -> None:
    storage.pause = 0.05  # ~3 MB in 64 KiB steps: a few seconds
    export_id = make_job(sessions, account_id=ids["run-b"], user_id=ids["user"])
    runner = make_runner(settings, sessions, storage)
    thread = threading.Thread(target=runner.run, args=(export_id,))
    thread.start()
    seen: list[tuple[int, int | None]] = []
    while thread.is_alive():
        job = job_of(sessions, export_id)
        if job.state is ExportState.RUNNING:
            seen.append((job.rows_written, job.rows_estimate))
        time.sleep(0.3)
    thread.join()
    written = [w for w, _ in seen]
    assert len(set(written)) >= 3, seen  # progress moved several times
    assert written == sorted(written)
    assert {e for _, e in seen if e is not None} == {
        ORDERS
    }  # exact estimate from the same snapshot
    assert job_of(sessions, export_id).state is ExportState.READY


def test_cancel_stops_a_running_copy_within_seconds(
    settings: Settings, sessions: sessionmaker[Session], storage: FaultyStorage, ids: dict[str, int]
) -> None:
    storage.pause = 0.2  # would take ~10 s
    export_id = make_job(sessions, account_id=ids["run-c"], user_id=ids["user"])
    runner = make_runner(settings, sessions, storage)
    results: list[RunOutcome] = []
    thread = threading.Thread(target=lambda: results.append(runner.run(export_id).outcome))
    thread.start()
    while job_of(sessions, export_id).rows_written == 0:
        time.sleep(0.1)
    from shared import lifecycle

    with transaction(sessions) as session:  # the user cancels it
        lifecycle.cancel(session, session.get_one(ExportJob, export_id), actor="user:1")
    canceled_at = time.monotonic()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert time.monotonic() - canceled_at < 4
    assert results == [RunOutcome.CANCELED]
    assert job_of(sessions, export_id).state is ExportState.CANCELED
    assert files_in(storage) == []  # no partial file, no leftovers


def test_statement_timeout_fails_as_user_fixable(
    settings: Settings, sessions: sessionmaker[Session], storage: FaultyStorage, ids: dict[str, int]
) -> None:
    storage.pause = 0.2
    export_id = make_job(sessions, account_id=ids["run-d"], user_id=ids["user"])
    result = make_runner(settings, sessions, storage, export_statement_timeout_seconds=1).run(
        export_id
    )
    assert result.outcome is RunOutcome.FAILED
    job = failed_with(sessions, export_id, "query_timeout", ErrorClass.USER)
    assert "Narrow the filters" in (job.error_message or "")
    assert files_in(storage) == []
    assert events_of(sessions, export_id)[-1]["final"] is True


def test_storage_failure_is_retried_then_fails_then_manual_retry_works(
    settings: Settings, sessions: sessionmaker[Session], storage: FaultyStorage, ids: dict[str, int]
) -> None:
    storage.failing = True
    export_id = make_job(sessions, account_id=ids["run-e"], user_id=ids["user"])
    runner = make_runner(settings, sessions, storage)
    outcomes = [runner.run(export_id) for _ in range(3)]
    assert [r.outcome for r in outcomes] == [RunOutcome.RETRY, RunOutcome.RETRY, RunOutcome.FAILED]
    assert outcomes[1].delay_seconds == 2 * outcomes[0].delay_seconds  # exponential backoff
    job = job_of(sessions, export_id)
    assert (job.state, job.attempts, job.error_code) == (
        ExportState.FAILED,
        3,
        "storage_unavailable",
    )
    assert (
        job.error_message
        == "The file could not be stored on any attempt. Retry the export in a few minutes."
    )
    failed = [e for e in events_of(sessions, export_id) if e["type"] == "ExportFailed"]
    assert [e["final"] for e in failed] == [False, False, True]
    assert "will be retried" in failed[0]["message"] and "any attempt" in failed[2]["message"]
    assert (
        runner.run(export_id).outcome is RunOutcome.SKIPPED
    )  # attempts used up, nothing claims it
    # When storage is back and the user retries
    storage.failing = False
    from shared import exports

    with transaction(sessions) as session:
        from shared.models import User

        user = session.get_one(User, ids["user"])
        exports.retry(
            session,
            settings=settings,
            flags=FlagCache(sessions, max_age=0),
            export_id=str(export_id),
            user=user,
        )
    assert runner.run(export_id).outcome is RunOutcome.READY
    assert job_of(sessions, export_id).attempts == 1


def test_worker_rows_cap_is_enforced_without_truncating(
    settings: Settings, sessions: sessionmaker[Session], storage: FaultyStorage, ids: dict[str, int]
) -> None:
    export_id = make_job(sessions, account_id=ids["run-a"], user_id=ids["user"])
    assert (
        make_runner(settings, sessions, storage, export_max_rows=ORDERS - 1).run(export_id).outcome
        is RunOutcome.FAILED
    )
    job = job_of(sessions, export_id)
    assert (job.error_code, job.error_class) == ("too_many_rows", ErrorClass.USER)
    assert files_in(storage) == []


def test_paused_workers_claim_nothing(
    settings: Settings, sessions: sessionmaker[Session], storage: FaultyStorage, ids: dict[str, int]
) -> None:
    export_id = make_job(sessions, account_id=ids["run-a"], user_id=ids["user"])
    with transaction(sessions) as session:
        set_flag(session, "workers_paused", True)
    try:
        assert make_runner(settings, sessions, storage).run(export_id).outcome is RunOutcome.PAUSED
        assert job_of(sessions, export_id).state is ExportState.QUEUED
    finally:
        with transaction(sessions) as session:
            set_flag(session, "workers_paused", False)
    assert make_runner(settings, sessions, storage).run(export_id).outcome is RunOutcome.READY


@pytest.fixture
def mail_sink(tmp_path: Path) -> Iterator[MailSink]:
    sink = MailSink(mail_dir=tmp_path / "mail", ready_file=tmp_path / "run" / "mail.ready")
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


def test_racing_workers_produce_one_file_one_event_one_email(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: FaultyStorage,
    ids: dict[str, int],
    mail_sink: MailSink,
) -> None:
    export_id = make_job(sessions, account_id=ids["run-f"], user_id=ids["user"])
    runner = make_runner(settings, sessions, storage)
    barrier = threading.Barrier(4)
    outcomes: list[RunOutcome] = []

    def race() -> None:
        barrier.wait()
        outcomes.append(runner.run(export_id).outcome)

    threads = [threading.Thread(target=race) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o.value for o in outcomes) == ["ready", "skipped", "skipped", "skipped"]
    assert len(files_in(storage)) == 1
    events = events_of(sessions, export_id)
    assert [e["type"] for e in events].count("ExportReady") == 1
    # and the notifier, even when handed every event twice, sends one email
    assert mail_sink.url is not None
    notifier = Notifier(
        settings=settings.model_copy(
            update={"smtp_url": mail_sink.url, "public_url": "http://127.0.0.1:9"}
        ),
        sessions=sessions,
    )
    for payload in events * 2:
        notifier.handle(decode(json.dumps(payload).encode()))
    assert len(mail_sink.messages()) == 1


def test_terminated_database_connection_is_retryable(
    settings: Settings, sessions: sessionmaker[Session], storage: FaultyStorage, ids: dict[str, int]
) -> None:
    storage.pause = 0.1
    export_id = make_job(sessions, account_id=ids["run-b"], user_id=ids["user"])
    runner = make_runner(settings, sessions, storage)
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(runner.run(export_id)))
    thread.start()
    while job_of(sessions, export_id).rows_written == 0:
        time.sleep(0.1)
    with transaction(sessions) as session:
        session.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'orders-export-worker'"
            )
        )
    thread.join(timeout=15)
    assert results[0].outcome is RunOutcome.RETRY
    job = job_of(sessions, export_id)
    assert (job.state, job.error_code) == (ExportState.QUEUED, "database_unavailable")
    storage.pause = 0
    assert runner.run(export_id).outcome is RunOutcome.READY
    assert files_in(storage) and len(files_in(storage)) == 1
