"""Housekeeping and retries under faults, against real PostgreSQL, Redis and storage: a hanging
storage call neither blocks the rescue of dead workers' jobs nor holds row locks; a Redis error in
one step does not end the others; work waiting in Redis is not sent twice; concurrent retries
keep the per-user cap; retrying an expired export emails its new file."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from services.worker.actors import EXPORTS_QUEUE, Actors, declare_actors, make_broker
from services.worker.maintenance import Maintenance
from shared import exports
from shared.db import make_engine, make_sessionmaker, transaction
from shared.devstack.mailsink import MailSink
from shared.devstack.ports import free_port
from shared.errors import Conflict, TooManyActiveExports
from shared.events import ExportReady
from shared.flags import FlagCache
from shared.identity import ensure_account, set_membership, upsert_user
from shared.models import ExportJob, ExportState, Notification, Role, User
from shared.notifications import Notifier
from shared.runner import ExportRunner, RunOutcome
from shared.settings import Settings
from shared.storage import Storage, storage_from_url
from tests.support.jobs import job_of, make_job, seeded_admin
from tests.support.storage import FaultyStorage, local_storage
from tests.support.waiting import run_together, wait_until


class HangingDeletes(FaultyStorage):
    """Local storage whose ``delete`` hangs until released (S3 unreachable: ~9 s per call)."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.entered = threading.Event()
        self.release = threading.Event()

    def delete(self, key: str) -> None:
        self.entered.set()
        self.release.wait(60)
        self.inner.delete(key)


@pytest.fixture(scope="module")
def ids(sessions: sessionmaker[Session]) -> dict[str, int]:
    found = seeded_admin(sessions, "keeper@example.test", [("keeper", 200, 2)])
    return {"account": found["keeper"], "user": found["user"]}


@pytest.fixture
def local(tmp_path: Path) -> Storage:
    return local_storage(tmp_path / "files")


def crashed_job(sessions: sessionmaker[Session], owner: dict[str, int]) -> uuid.UUID:
    """A running job of a worker that died: its lease ran out seconds ago."""
    return make_job(
        sessions,
        **owner,
        state=ExportState.RUNNING,
        attempts=1,
        worker_id="dead",
        lease_expires_at=past(5),
    )


def past(seconds: int = 60) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)


def test_a_hanging_storage_delete_blocks_neither_rescue_nor_the_job_rows(
    settings: Settings,
    sessions: sessionmaker[Session],
    local: Storage,
    actors: Actors,
    ids: dict[str, int],
) -> None:
    owner = {"account_id": ids["account"], "user_id": ids["user"]}
    storage = HangingDeletes(local)
    expired = make_job(
        sessions, **owner, state=ExportState.READY, storage_key="a/b.csv", expires_at=past()
    )
    maintenance = Maintenance(settings=settings, sessions=sessions, storage=storage, actors=actors)
    stop = threading.Event()
    thread = threading.Thread(target=maintenance.run, args=(stop,), daemon=True)
    thread.start()
    try:
        # Given expiry stuck in a storage delete
        assert storage.entered.wait(30)
        # Then the job row is not locked meanwhile
        with transaction(sessions) as session:
            session.execute(text("SET LOCAL lock_timeout = '1s'"))
            locked = session.execute(
                select(ExportJob.id).where(ExportJob.id == expired).with_for_update(nowait=True)
            ).all()
            assert len(locked) == 1
        # And a dead worker's job is rescued all the same
        crashed = crashed_job(sessions, owner)
        wait_until(lambda: job_of(sessions, crashed).state is ExportState.QUEUED, what="the rescue")
    finally:
        storage.release.set()
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    wait_until(lambda: job_of(sessions, expired).state is ExportState.EXPIRED, what="the expiry")


def test_a_redis_error_in_rescue_does_not_stop_expiry(
    settings: Settings, sessions: sessionmaker[Session], local: Storage, ids: dict[str, int]
) -> None:
    owner = {"account_id": ids["account"], "user_id": ids["user"]}
    dead_redis = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    broker = make_broker(dead_redis)
    try:
        actors = declare_actors(broker, runner=None, sessions=sessions)
        maintenance = Maintenance(
            settings=settings, sessions=sessions, storage=local, actors=actors
        )
        crashed = crashed_job(sessions, owner)
        expired = make_job(
            sessions, **owner, state=ExportState.READY, storage_key="x/y.csv", expires_at=past()
        )
        maintenance.round()  # Redis is unreachable: sending the rescued job's work fails
    finally:
        broker.close()
    assert job_of(sessions, crashed).state is ExportState.QUEUED  # resent later by housekeeping
    assert job_of(sessions, expired).state is ExportState.EXPIRED


def test_work_waiting_in_redis_for_a_worker_thread_is_not_sent_again(
    settings: Settings,
    sessions: sessionmaker[Session],
    local: Storage,
    actors: Actors,
    redis_url: str,
    ids: dict[str, int],
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.delete(f"dramatiq:{EXPORTS_QUEUE}", f"dramatiq:{EXPORTS_QUEUE}.msgs")
    waiting = make_job(sessions, account_id=ids["account"], user_id=ids["user"])
    lost = make_job(sessions, account_id=ids["account"], user_id=ids["user"])
    actors.send_generate(str(waiting))  # in the queue, no free worker thread yet
    with transaction(sessions) as session:
        for export_id in (waiting, lost):
            session.execute(
                text("UPDATE export_jobs SET enqueued_at = now() - interval '1 h' WHERE id = :i"),
                {"i": export_id},
            )
    maintenance = Maintenance(settings=settings, sessions=sessions, storage=local, actors=actors)
    assert maintenance.resend() == 1  # only the job whose message was lost
    assert client.llen(f"dramatiq:{EXPORTS_QUEUE}") == 2
    client.delete(f"dramatiq:{EXPORTS_QUEUE}", f"dramatiq:{EXPORTS_QUEUE}.msgs")


def test_concurrent_retries_keep_the_active_cap(
    settings: Settings, sessions: sessionmaker[Session], ids: dict[str, int]
) -> None:
    with transaction(sessions) as session:
        user = upsert_user(session, email="racer@example.test", password="long-enough-pw")
        account = ensure_account(session, slug="racer", timezone="UTC")
        set_membership(session, account=account, user=user, role=Role.ADMIN)
        user_id, account_id = user.id, account.id
    cap, racers = 2, 6
    capped = settings.model_copy(update={"export_max_active_per_user": cap})
    flags = FlagCache(sessions, max_age=0)
    engine = make_engine(settings.database_url, pool_size=racers)
    racing = make_sessionmaker(engine)

    def retry(export_id: uuid.UUID, barrier: threading.Barrier, outcomes: list[str]) -> None:
        with racing() as session, session.begin():
            retry_user = session.get_one(User, user_id)
            barrier.wait()  # every transaction is open: they retry at the same moment
            try:
                exports.retry(
                    session, settings=capped, flags=flags, export_id=str(export_id), user=retry_user
                )
                outcomes.append("queued")
            except (TooManyActiveExports, Conflict):
                outcomes.append("refused")

    try:
        for _round in range(5):
            failed = [
                make_job(sessions, account_id=account_id, user_id=user_id, state=ExportState.FAILED)
                for _ in range(racers)
            ]
            barrier = threading.Barrier(racers)
            outcomes: list[str] = []
            run_together(retry, [(e, barrier, outcomes) for e in failed])
            with sessions() as session:
                active = session.scalar(
                    text(
                        "SELECT count(*) FROM export_jobs WHERE requested_by = :u"
                        " AND state IN ('queued', 'running')"
                    ),
                    {"u": user_id},
                )
            assert (active, outcomes.count("queued")) == (cap, cap), outcomes
            with transaction(sessions) as session:  # make room for the next round
                session.execute(
                    text(
                        "UPDATE export_jobs SET state = 'canceled' WHERE requested_by = :u"
                        " AND state = 'queued'"
                    ),
                    {"u": user_id},
                )
    finally:
        engine.dispose()


def test_retrying_an_expired_export_emails_the_new_file(
    settings: Settings,
    sessions: sessionmaker[Session],
    local: Storage,
    ids: dict[str, int],
    sink: MailSink,
) -> None:
    notifier = Notifier(
        settings=settings.model_copy(
            update={"smtp_url": sink.url, "public_url": "http://127.0.0.1:9"}
        ),
        sessions=sessions,
    )
    runner = ExportRunner(
        settings=settings, sessions=sessions, storage=local, flags=FlagCache(sessions, max_age=0)
    )
    export_id = make_job(sessions, account_id=ids["account"], user_id=ids["user"])

    def ready_event() -> ExportReady:
        job = job_of(sessions, export_id)
        assert job.expires_at is not None and job.row_count is not None
        return ExportReady(
            export_id=str(export_id),
            account="keeper",
            requested_by=ids["user"],
            row_count=job.row_count,
            size_bytes=job.size_bytes or 0,
            expires_at=job.expires_at.isoformat(),
        )

    assert runner.run(export_id).outcome is RunOutcome.READY
    notifier.handle(ready_event())
    assert len(sink.messages()) == 1
    # When the file expires and the user retries the export
    with transaction(sessions) as session:
        session.execute(
            text("UPDATE export_jobs SET state = 'expired', storage_key = NULL WHERE id = :id"),
            {"id": export_id},
        )
    with transaction(sessions) as session:
        exports.retry(
            session,
            settings=settings,
            flags=FlagCache(sessions, max_age=0),
            export_id=str(export_id),
            user=session.get_one(User, ids["user"]),
        )
    assert runner.run(export_id).outcome is RunOutcome.READY
    notifier.handle(ready_event())
    # Then the new file gets its own email
    assert len(sink.messages()) == 2
    with sessions() as session:
        row = session.get_one(Notification, (export_id, "ready"))
        assert row.sent_at is not None


def test_the_bucket_lifecycle_rule_follows_the_file_ttl(settings: Settings) -> None:
    from shared.storage import lifecycle_days

    assert lifecycle_days(7 * 24 * 3600) == 8  # the TTL, plus a day of margin
    assert lifecycle_days(30 * 24 * 3600) == 31
    assert lifecycle_days(60) == 2
    s3 = storage_from_url(
        "s3://key:secret@127.0.0.1:9/bucket",
        expire_days=lifecycle_days(30 * 24 * 3600),
    )
    assert s3.expire_days == 31  # type: ignore[attr-defined]
