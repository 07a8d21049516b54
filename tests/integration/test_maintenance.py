"""Housekeeping against real PostgreSQL, storage and Redis: rescue, expiry, resend."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from services.worker.actors import EXPORTS_QUEUE, Actors
from services.worker.maintenance import Maintenance
from shared import lifecycle
from shared.db import transaction
from shared.models import ExportJob, ExportState, OutboxMessage
from shared.settings import Settings
from shared.storage import Storage, new_object_key
from tests.support.jobs import account_and_user, attempt_key, job_of, make_job, strays_of
from tests.support.storage import FaultyStorage, local_storage


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Storage:
    return local_storage(Path(tmp_path_factory.mktemp("files")))


@pytest.fixture(scope="module")
def ids(sessions: sessionmaker[Session]) -> dict[str, int]:
    return account_and_user(sessions, "house", "house@example.test")


@pytest.fixture
def maintenance(
    settings: Settings, sessions: sessionmaker[Session], storage: Storage, actors: Actors
) -> Maintenance:
    return Maintenance(settings=settings, sessions=sessions, storage=storage, actors=actors)


def queued_messages(redis_url: str) -> int:
    return int(redis.Redis.from_url(redis_url).llen(f"dramatiq:{EXPORTS_QUEUE}"))


def test_rescue_requeues_jobs_of_dead_workers_and_fails_exhausted_ones(
    maintenance: Maintenance,
    sessions: sessionmaker[Session],
    ids: dict[str, int],
    redis_url: str,
    storage: Storage,
) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    owner = {"account_id": ids["account"], "user_id": ids["user"], "state": ExportState.RUNNING}
    # Each attempt's file is stored: complete, as when a worker dies between its upload and
    # its ready commit
    keys = [attempt_key(ids["account"]) for _ in range(3)]
    for key in keys:
        storage.put(key, io.BytesIO(b"customer data"))
    alive = make_job(
        sessions,
        **owner,
        attempts=1,
        worker_id="alive",
        lease_expires_at=past + dt.timedelta(minutes=10),
        attempt_key=keys[0],
    )
    crashed = make_job(
        sessions, **owner, attempts=1, worker_id="dead", lease_expires_at=past, attempt_key=keys[1]
    )
    exhausted = make_job(
        sessions, **owner, attempts=3, worker_id="dead", lease_expires_at=past, attempt_key=keys[2]
    )
    before = queued_messages(redis_url)
    assert maintenance.rescue() == 1
    assert job_of(sessions, alive).state is ExportState.RUNNING
    # The dead attempts' files are strays, deleted by the sweep; the live worker's stays
    assert set(strays_of(sessions)) >= {keys[1], keys[2]}
    assert keys[0] not in strays_of(sessions)
    maintenance.sweep()
    assert [storage.exists(key) for key in keys] == [True, False, False]
    assert not {keys[1], keys[2]} & set(strays_of(sessions))
    rescued = job_of(sessions, crashed)
    assert (rescued.state, rescued.worker_id, rescued.error_code) == (
        ExportState.QUEUED,
        None,
        "worker_lost",
    )
    failed = job_of(sessions, exhausted)
    assert (failed.state, failed.error_code) == (ExportState.FAILED, "worker_lost")
    assert queued_messages(redis_url) == before + 1  # a work message for the rescued job only
    with sessions() as session:
        final = session.scalars(
            select(OutboxMessage.payload["final"].as_boolean()).where(
                OutboxMessage.key == str(exhausted)
            )
        ).all()
    assert final == [True]


def test_a_canceled_running_export_loses_its_attempts_file_even_if_its_worker_is_gone(
    maintenance: Maintenance, sessions: sessionmaker[Session], ids: dict[str, int], storage: Storage
) -> None:
    # Given a running export whose worker stored its file and died before its ready commit
    key = attempt_key(ids["account"])
    storage.put(key, io.BytesIO(b"customer data"))
    export_id = make_job(
        sessions, account_id=ids["account"], user_id=ids["user"], state=ExportState.RUNNING,
        attempts=1, worker_id="dead", attempt_key=key,
        lease_expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30),
    )  # fmt: skip
    # When the user cancels it before its lease runs out (so no rescue ever sees it)
    with transaction(sessions) as session:
        assert lifecycle.cancel(session, session.get_one(ExportJob, export_id), actor="user:1")
    # Then housekeeping deletes the file
    maintenance.sweep()
    assert not storage.exists(key)
    assert key not in strays_of(sessions)


def test_a_stray_file_storage_cannot_delete_now_is_deleted_once_it_can(
    settings: Settings,
    sessions: sessionmaker[Session],
    actors: Actors,
    storage: Storage,
    ids: dict[str, int],
) -> None:
    faulty = FaultyStorage(storage)
    house = Maintenance(settings=settings, sessions=sessions, storage=faulty, actors=actors)
    key = attempt_key(ids["account"])
    storage.put(key, io.BytesIO(b"customer data"))
    with transaction(sessions) as session:
        lifecycle.record_stray(session, key, export_id=None)
    faulty.failing_deletes = True
    house.sweep()  # storage away: nothing deleted, nothing forgotten
    assert storage.exists(key) and key in strays_of(sessions)
    faulty.failing_deletes = False
    house.sweep()
    assert not storage.exists(key) and key not in strays_of(sessions)


def test_expiry_deletes_the_file_and_marks_the_export_expired(
    maintenance: Maintenance, sessions: sessionmaker[Session], storage: Storage, ids: dict[str, int]
) -> None:
    keys = {}
    for name, offset in (("old", -60), ("fresh", 3600)):
        key = new_object_key(account_id=ids["account"], export_id=name)
        storage.put(key, io.BytesIO(b"number\nA-1\n"))
        expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset)
        export_id = make_job(
            sessions, account_id=ids["account"], user_id=ids["user"], state=ExportState.READY,
            storage_key=key, expires_at=expires_at,
        )  # fmt: skip
        keys[name] = (key, export_id)
    assert maintenance.expire() == 1
    old_key, old_id = keys["old"]
    assert job_of(sessions, old_id).state is ExportState.EXPIRED
    assert not storage.exists(old_key)
    fresh_key, fresh_id = keys["fresh"]
    assert job_of(sessions, fresh_id).state is ExportState.READY and storage.exists(fresh_key)
    with sessions() as session:
        types = session.scalars(
            select(OutboxMessage.payload["type"].as_string()).where(
                OutboxMessage.key == str(old_id)
            )
        )
        assert "ExportExpired" in list(types)


def test_lost_work_messages_are_sent_again(
    maintenance: Maintenance,
    sessions: sessionmaker[Session],
    ids: dict[str, int],
    redis_url: str,
    settings: Settings,
) -> None:
    stale = make_job(sessions, account_id=ids["account"], user_id=ids["user"])
    recent = make_job(sessions, account_id=ids["account"], user_id=ids["user"])
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(
        seconds=settings.export_requeue_after_seconds + 5
    )
    with transaction(sessions) as session:
        session.execute(
            update(ExportJob)
            .where(ExportJob.id == stale)
            .values(enqueued_at=long_ago, created_at=long_ago)
        )
        session.execute(
            update(ExportJob)
            .where(ExportJob.id == recent)
            .values(enqueued_at=dt.datetime.now(dt.UTC))
        )
    before = queued_messages(redis_url)
    assert maintenance.resend() == 1
    assert queued_messages(redis_url) == before + 1
    assert maintenance.resend() == 0  # enqueued_at moved on: not sent twice
