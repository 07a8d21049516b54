"""The worker process stopped with SIGTERM while an export runs that cannot finish within the
grace period: it stops claiming at once, hands the export back to ``queued`` without using up an
attempt, and exits cleanly in time. Real worker process, PostgreSQL, Redis, Kafka-protocol broker
and local storage."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from services.worker.actors import Actors
from shared.flags import FlagCache
from shared.models import ExportState, ExportTransition, OutboxMessage
from shared.runner import ExportRunner, RunOutcome
from shared.settings import Settings
from shared.storage import storage_from_url
from tests.support.jobs import job_of, make_job, seeded_admin
from tests.support.processes import WorkerProcess, kill_if_running, terminate
from tests.support.waiting import wait_until

#: docker-compose's stop_grace_period for the worker (seconds).
COMPOSE_STOP_GRACE_SECONDS = int(
    yaml.safe_load((Path(__file__).parents[2] / "docker-compose.yml").read_text())["services"][
        "worker"
    ]["stop_grace_period"].removesuffix("s")
)
#: Grace the test gives running exports (seconds); the export needs far longer.
GRACE_SECONDS = 2


@pytest.fixture(scope="module")
def ids(sessions: sessionmaker[Session]) -> dict[str, int]:
    found = seeded_admin(sessions, "shutdown@example.test", [("shutdown", 5000, 11)])
    return {"user": found["user"], "account": found["shutdown"]}


def test_sigterm_hands_back_an_export_that_cannot_finish_within_the_grace(
    settings: Settings,
    sessions: sessionmaker[Session],
    run_worker: WorkerProcess,
    actors: Actors,
    ids: dict[str, int],
    tmp_path: Path,
) -> None:
    files, log_path = tmp_path / "files", tmp_path / "worker.log"  # the worker's (conftest)
    worker = run_worker(
        EXPORT_MAX_BYTES_PER_SECOND="40000",  # ~600 kB: about 15 s
        WORKER_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
    )
    try:
        # Given an export the worker is streaming
        export_id = make_job(sessions, account_id=ids["account"], user_id=ids["user"])
        actors.send_generate(str(export_id))
        wait_until(lambda: job_of(sessions, export_id).rows_written > 0, what="the export to run")
        # When the worker is asked to stop (a deploy)
        # Then it exits cleanly within docker-compose's stop_grace_period
        assert terminate(worker, COMPOSE_STOP_GRACE_SECONDS) == 0
    finally:
        kill_if_running(worker)
    # And the export is back in the queue at once, its attempt not used up, nothing stored
    job = job_of(sessions, export_id)
    assert (job.state, job.attempts, job.worker_id, job.lease_expires_at, job.error_code) == (
        ExportState.QUEUED,
        0,
        None,
        None,
        None,
    )
    with sessions() as session:
        last = session.scalars(
            select(ExportTransition)
            .where(ExportTransition.export_id == export_id)
            .order_by(ExportTransition.id.desc())
        ).first()
        assert last is not None
        assert (last.from_state, last.to_state, last.detail) == (
            ExportState.RUNNING,
            ExportState.QUEUED,
            "shutdown",
        )
        assert last.actor.startswith("worker:")
        newest = session.scalars(
            select(OutboxMessage.payload)
            .where(OutboxMessage.key == str(export_id))
            .order_by(OutboxMessage.id.desc())
        ).first()
        assert newest is not None and newest["type"] == "ExportRequested"  # work is sent again
        running = session.scalar(text("SELECT count(*) FROM export_jobs WHERE state = 'running'"))
        assert running == 0
    assert [p for p in files.rglob("*") if p.is_file()] == []
    assert "handed back" in log_path.read_text()
    # And the next worker runs it as its first attempt
    storage = storage_from_url(files.as_uri())
    runner = ExportRunner(
        settings=settings, sessions=sessions, storage=storage, flags=FlagCache(sessions)
    )
    assert runner.run(export_id).outcome is RunOutcome.READY
    assert job_of(sessions, export_id).attempts == 1
