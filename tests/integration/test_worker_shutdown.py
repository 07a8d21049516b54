"""The worker process stopped with SIGTERM while an export runs that cannot finish within the
grace period: it stops claiming at once, hands the export back to ``queued`` without using up an
attempt, and exits cleanly in time. Real worker process, PostgreSQL, Redis, Kafka-protocol broker
and local storage."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from services.worker.actors import Actors
from shared.db import transaction
from shared.flags import FlagCache
from shared.identity import ensure_account, set_membership, upsert_user
from shared.models import ExportJob, ExportState, ExportTransition, OutboxMessage, Role
from shared.runner import ExportRunner, RunOutcome
from shared.seeding import seed_orders
from shared.settings import Settings
from shared.storage import storage_from_url
from tests.integration.exportdata import make_job
from tests.support.processes import start_worker

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
    with transaction(sessions) as session:
        user = upsert_user(session, email="shutdown@example.test", password="long-enough-pw")
        account = ensure_account(session, slug="shutdown", timezone="UTC")
        set_membership(session, account=account, user=user, role=Role.ADMIN)
        seed_orders(session, account, orders=5000, seed=11)
        return {"user": user.id, "account": account.id}


def job_of(sessions: sessionmaker[Session], export_id: uuid.UUID) -> ExportJob:
    with sessions() as session:
        return session.get_one(ExportJob, export_id)


def wait_for(condition: object, *, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_sigterm_hands_back_an_export_that_cannot_finish_within_the_grace(
    settings: Settings,
    sessions: sessionmaker[Session],
    redis_url: str,
    broker: str,
    actors: Actors,
    ids: dict[str, int],
    tmp_path: Path,
) -> None:
    files = tmp_path / "files"
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "SECRET_KEY": settings.secret_key,
        "REDIS_URL": redis_url,
        "KAFKA_BOOTSTRAP_SERVERS": broker,
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "STORAGE_URL": files.as_uri(),
        "EXPORT_MAX_BYTES_PER_SECOND": "40000",  # ~600 kB: about 15 s
        "WORKER_SHUTDOWN_GRACE_SECONDS": str(GRACE_SECONDS),
    }
    log_path = tmp_path / "worker.log"
    worker = start_worker(env, log_path)
    try:
        # Given an export the worker is streaming
        export_id = make_job(sessions, account_id=ids["account"], user_id=ids["user"])
        actors.send_generate(str(export_id))
        wait_for(lambda: job_of(sessions, export_id).rows_written > 0, what="the export to run")
        # When the worker is asked to stop (a deploy)
        worker.send_signal(signal.SIGTERM)
        # Then it exits cleanly within docker-compose's stop_grace_period
        assert worker.wait(COMPOSE_STOP_GRACE_SECONDS) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
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
