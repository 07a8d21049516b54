"""The backlog gauges against real PostgreSQL, Redis (Dramatiq's broker) and a Kafka-protocol
broker: jobs per state, oldest queued, stalled jobs, outbox, queue depth, consumer lag."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, Producer
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import delete, update
from sqlalchemy.orm import Session, sessionmaker

from services.worker.actors import EXPORTS_QUEUE, Actors
from services.worker.maintenance import Maintenance
from shared import backlog, outbox
from shared.backlog import BacklogMonitor, ConsumerLag, read_jobs, read_queue_depth
from shared.db import transaction
from shared.devstack.ports import free_port
from shared.events import TOPIC_REQUESTED, ExportRequested
from shared.metrics import Backlog, BacklogCollector, JobsSnapshot
from shared.models import ExportJob, ExportState, ExportTransition, OutboxMessage
from shared.settings import Settings
from shared.storage import storage_from_url
from tests.support.jobs import account_and_user, make_job

LEASE_SECONDS = 30
DELAYED = f"{EXPORTS_QUEUE}.DQ"


@pytest.fixture(scope="module")
def ids(sessions: sessionmaker[Session]) -> dict[str, int]:
    return account_and_user(sessions, "gauges", "gauges@example.test")


def job(sessions: sessionmaker[Session], ids: dict[str, int], **values: Any) -> uuid.UUID:
    return make_job(sessions, account_id=ids["account"], user_id=ids["user"], **values)


@pytest.fixture
def clean(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        session.execute(delete(ExportJob))
        session.execute(delete(OutboxMessage))


def read(sessions: sessionmaker[Session], *, settled: dict[str, int] | None = None) -> JobsSnapshot:
    with transaction(sessions) as session:
        return read_jobs(session, stalled_after_seconds=LEASE_SECONDS, settled=settled)


def test_jobs_per_state_stalled_jobs_and_the_oldest_queued_job(
    sessions: sessionmaker[Session], ids: dict[str, int], clean: None
) -> None:
    now = dt.datetime.now(dt.UTC)
    # Given two queued jobs: one created days ago but retried 100 s ago, one waiting for 40 s
    retried = job(sessions, ids, created_at=now - dt.timedelta(days=2))
    waiting = job(sessions, ids)
    with transaction(sessions) as session:
        for export_id, seconds in ((retried, 100), (waiting, 40)):
            session.execute(
                update(ExportTransition)
                .where(ExportTransition.export_id == export_id)
                .values(at=now - dt.timedelta(seconds=seconds))
            )
    # And a healthy running job, one whose heartbeat stopped 2 minutes ago, and finished ones
    job(sessions, ids, state=ExportState.RUNNING, heartbeat_at=now)
    job(sessions, ids, state=ExportState.RUNNING, heartbeat_at=now - dt.timedelta(minutes=2))
    for state in (ExportState.READY, ExportState.FAILED, ExportState.EXPIRED):
        job(sessions, ids, state=state)

    snapshot = read(sessions)

    assert snapshot.per_state == {
        "queued": 2, "running": 2, "ready": 1, "failed": 1, "canceled": 0, "expired": 1,
    }  # fmt: skip
    assert snapshot.stalled == 1
    assert 99 <= snapshot.oldest_queued_seconds < 130
    # The settled states may come from an earlier, slower reading
    cached = read(sessions, settled={"ready": 7, "failed": 0, "canceled": 0, "expired": 0})
    assert cached.per_state["ready"] == 7 and cached.per_state["queued"] == 2


def test_no_queued_job_means_zero_age(sessions: sessionmaker[Session], clean: None) -> None:
    snapshot = read(sessions)
    assert snapshot.oldest_queued_seconds == 0
    assert snapshot.outbox_pending == 0 and snapshot.outbox_oldest_pending_seconds == 0
    assert set(snapshot.per_state.values()) == {0}


def test_outbox_pending_and_its_oldest_row(sessions: sessionmaker[Session], clean: None) -> None:
    with transaction(sessions) as session:
        for _ in range(3):
            outbox.add(session, ExportRequested(export_id=str(uuid.uuid4()), account="gauges"))
    with transaction(sessions) as session:
        first = min(row.id for row in session.query(OutboxMessage))
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == first)
            .values(created_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=75))
        )
        session.execute(  # the third one is published already
            update(OutboxMessage)
            .where(OutboxMessage.id == first + 2)
            .values(published_at=dt.datetime.now(dt.UTC))
        )

    snapshot = read(sessions)

    assert snapshot.outbox_pending == 2
    assert 74 <= snapshot.outbox_oldest_pending_seconds < 100


def test_queue_depth_counts_waiting_and_delayed_dramatiq_messages(
    redis_url: str, actors: Actors
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    # Given two messages ready to run and one delayed (a retry, or a paused worker's re-send)
    actors.send_generate(str(uuid.uuid4()))
    actors.send_generate(str(uuid.uuid4()))
    actors.send_generate(str(uuid.uuid4()), delay_ms=60_000)

    depth = read_queue_depth(client, namespace="dramatiq", queues=(EXPORTS_QUEUE, DELAYED))

    assert depth == {EXPORTS_QUEUE: 2, DELAYED: 1}


def test_a_rescued_job_counts_as_a_worker_lost_failure_and_a_retry(
    settings: Settings,
    sessions: sessionmaker[Session],
    ids: dict[str, int],
    actors: Actors,
    tmp_path: Path,
    clean: None,
) -> None:
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    job(sessions, ids, state=ExportState.RUNNING, attempts=1, lease_expires_at=past)
    storage = storage_from_url(tmp_path.as_uri())
    before = (sample("orders_export_failures_total", reason="worker_lost"),
              sample("orders_export_retries_total"))  # fmt: skip

    Maintenance(settings=settings, sessions=sessions, storage=storage, actors=actors).rescue()

    assert sample("orders_export_failures_total", reason="worker_lost") == before[0] + 1
    assert sample("orders_export_retries_total") == before[1] + 1


def test_consumer_lag_is_high_watermark_minus_committed_offset(
    settings: Settings, broker: str
) -> None:
    group = f"lag-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": broker})
    for number in range(5):
        producer.produce(TOPIC_REQUESTED, key=str(number), value=b"{}")
    assert producer.flush(10) == 0
    lag = ConsumerLag(
        settings.model_copy(update={"kafka_bootstrap_servers": broker}),
        {group: (TOPIC_REQUESTED, "exports.never-written")},
    )
    try:
        # Nothing committed yet: everything is lag; a topic nobody wrote to has none
        assert lag.read() == {(group, TOPIC_REQUESTED): 5, (group, "exports.never-written"): 0}
        # When the group consumes and commits 3 messages
        consumer = Consumer(
            {
                "bootstrap.servers": broker,
                "group.id": group,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 500,
            }
        )
        consumer.subscribe([TOPIC_REQUESTED])
        taken = 0
        deadline = time.monotonic() + 30
        while taken < 3 and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                consumer.commit(message=message, asynchronous=False)
                taken += 1
        consumer.close()
        assert taken == 3
        # Then the lag is what is left
        assert lag.read()[(group, TOPIC_REQUESTED)] == 2
    finally:
        lag.close()


def test_monitor_leaves_out_what_it_cannot_read_and_drops_stale_readings(
    settings: Settings, sessions: sessionmaker[Session], ids: dict[str, int], clean: None
) -> None:
    job(sessions, ids)
    now = [1000.0]
    monitor = BacklogMonitor(
        settings=settings.model_copy(
            update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"}
        ),
        sessions=sessions,
        redis_client=redis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0)),
        namespace="dramatiq",
        queues=(EXPORTS_QUEUE, DELAYED),
        consumer_groups={},  # nothing to ask Kafka
        clock=lambda: now[0],
    )
    registry = CollectorRegistry()
    registry.register(BacklogCollector(monitor.snapshot))

    # When Redis is down but PostgreSQL answers
    reading = monitor.refresh()

    assert reading.jobs is not None and reading.jobs.per_state["queued"] == 1
    assert reading.queue_depth is None and reading.consumer_lag == {}
    text = generate_latest(registry).decode()
    assert 'orders_export_jobs{state="queued"} 1.0' in text
    assert "orders_export_oldest_queued_seconds" in text
    assert "orders_export_queue_depth" not in text
    # And a reading nobody refreshed for long is not served at all
    now[0] += backlog.STALE_AFTER_SECONDS + 1
    assert monitor.snapshot() == Backlog()
    assert "orders_export_jobs" not in generate_latest(registry).decode()
