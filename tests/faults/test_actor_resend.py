"""The actor's delayed re-send (busy account, automatic retry) while Redis is unreachable: it
must not raise (which would only dead-letter the message) and must leave the job to
housekeeping, with ``enqueued_at`` refreshed so that the re-send happens after the usual wait."""

from __future__ import annotations

import datetime as dt
import logging
import uuid

import pytest
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from services.worker import actors as actors_module
from shared.db import transaction
from shared.devstack.ports import free_port
from shared.identity import ensure_account, upsert_user
from shared.models import ExportJob, ExportState
from shared.runner import Result, RunOutcome
from tests.support.jobs import make_job


class BusyRunner:
    """An ExportRunner stand-in: the account is busy, come back later."""

    def __init__(self, outcome: RunOutcome) -> None:
        self.outcome = outcome
        self.runs: list[uuid.UUID] = []

    def run(self, export_id: uuid.UUID) -> Result:
        self.runs.append(export_id)
        return Result(self.outcome, delay_seconds=0.5)


@pytest.mark.parametrize("outcome", [RunOutcome.BUSY, RunOutcome.RETRY])
def test_redis_down_when_the_actor_resends_leaves_the_job_to_housekeeping(
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    outcome: RunOutcome,
) -> None:
    with transaction(sessions) as session:
        account = ensure_account(session, slug="resend", timezone="UTC")
        user = upsert_user(session, email="resend@example.test", password="long-enough-pw")
        ids = (account.id, user.id)
    export_id = make_job(sessions, account_id=ids[0], user_id=ids[1])
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    with transaction(sessions) as session:
        session.execute(
            update(ExportJob).where(ExportJob.id == export_id).values(enqueued_at=long_ago)
        )
    # Given a worker whose Redis is gone (nothing listens on its port)
    broker = RedisBroker(url=f"redis://127.0.0.1:{free_port()}/0")  # type: ignore[no-untyped-call]
    runner = BusyRunner(outcome)
    declared = actors_module.declare_actors(broker, runner=runner, sessions=sessions)  # type: ignore[arg-type]
    monkeypatch.setattr(actors_module, "RESEND_PAUSE_SECONDS", 0.01)
    # When the actor finds the job must wait and tries to send its next message
    with caplog.at_level(logging.WARNING, logger=actors_module.__name__):
        declared.generate_csv.fn(str(export_id))
    # Then it does not raise, says housekeeping will send it, and the job waits, marked fresh
    assert runner.runs == [export_id]
    assert "housekeeping will send it" in caplog.text
    with sessions() as session:
        job = session.get_one(ExportJob, export_id)
        assert job.state is ExportState.QUEUED
        assert job.enqueued_at is not None and job.enqueued_at > long_ago
    broker.close()
