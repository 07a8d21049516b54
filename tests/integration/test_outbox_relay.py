"""The outbox relay against real PostgreSQL and a real Kafka-protocol broker (mock cluster)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer
from sqlalchemy import delete, select, text
from sqlalchemy.orm import Session, sessionmaker

from shared.db import transaction
from shared.devstack.children import python_env
from shared.devstack.kafka_broker import KafkaBroker
from shared.events import (
    TOPIC_LIFECYCLE,
    TOPIC_REQUESTED,
    ExportReady,
    ExportRequested,
    ExportStarted,
    decode,
)
from shared.models import OutboxMessage
from shared.outbox import OutboxRelay, add, pending_count
from shared.settings import Settings
from tests.support.processes import kill_if_running, terminate

#: Consumer session timeout for the mock cluster (ms; see docs/ENVIRONMENT notes).
TEST_SESSION_TIMEOUT_MS = 6000
#: Longest wait for messages to come back from the broker (seconds).
CONSUME_TIMEOUT = 30.0
#: Delivery timeout of a relay talking to a dead broker (seconds; keeps the test short).
DEAD_BROKER_DELIVERY_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def kafka_settings(settings: Settings, broker: str) -> Settings:
    return settings.model_copy(
        update={
            "kafka_bootstrap_servers": broker,
            "kafka_session_timeout_ms": TEST_SESSION_TIMEOUT_MS,
        }
    )


@pytest.fixture(autouse=True)
def empty_outbox(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        session.execute(delete(OutboxMessage))


def consume(bootstrap: str, topics: list[str], *, until: Callable[[list[Any]], bool]) -> list[Any]:
    """Read ``topics`` from the start in a fresh group until ``until(messages)`` holds."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": TEST_SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": 500,
            "allow.auto.create.topics": True,
        }
    )
    messages: list[Any] = []
    try:
        consumer.subscribe(topics)
        deadline = time.monotonic() + CONSUME_TIMEOUT
        while not until(messages):
            assert time.monotonic() < deadline, f"only {len(messages)} messages came back"
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                messages.append(message)
    finally:
        consumer.close()
    return messages


def outbox_rows(sessions: sessionmaker[Session]) -> list[OutboxMessage]:
    with transaction(sessions) as session:
        return list(session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def test_events_are_published_to_their_topic_keyed_by_export_id(
    kafka_settings: Settings, broker: str, sessions: sessionmaker[Session]
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    events = [
        ExportRequested(export_id=ids[0], account="acme"),
        ExportStarted(export_id=ids[1], account="acme", attempt=1),
        ExportReady(
            export_id=ids[2],
            account="acme",
            requested_by=7,
            row_count=50_000,
            size_bytes=1234,
            expires_at="2030-01-01T00:00:00+00:00",
        ),
    ]
    with transaction(sessions) as session:
        for event in events:
            add(session, event)

    relay = OutboxRelay(settings=kafka_settings, sessions=sessions)
    assert relay.publish_pending() == 3
    assert relay.publish_pending() == 0
    rows = outbox_rows(sessions)
    assert [row.published_at is not None for row in rows] == [True] * 3
    assert [row.attempts for row in rows] == [0, 0, 0]
    with transaction(sessions) as session:
        assert pending_count(session) == 0

    def seen_all(messages: list[Any]) -> bool:
        return {m.key().decode() for m in messages} >= set(ids)

    messages = consume(broker, [TOPIC_REQUESTED, TOPIC_LIFECYCLE], until=seen_all)
    by_key = {m.key().decode(): m for m in messages if m.key().decode() in ids}
    for event in events:
        message = by_key[event.export_id]
        assert message.topic() == event.topic
        assert decode(message.value()) == event


def test_a_rolled_back_transaction_publishes_nothing(
    kafka_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    with pytest.raises(RuntimeError), transaction(sessions) as session:
        add(session, ExportRequested(export_id=str(uuid.uuid4()), account="acme"))
        session.flush()
        raise RuntimeError("the API request failed after writing")

    relay = OutboxRelay(settings=kafka_settings, sessions=sessions)
    assert relay.publish_pending() == 0
    assert outbox_rows(sessions) == []


def test_broker_down_keeps_rows_and_a_new_broker_gets_the_backlog_in_order(
    settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    gone = KafkaBroker(ready_file=tmp_path / "gone.ready", pid_file=tmp_path / "gone.pid")
    try:
        gone_address = gone.start()
    finally:
        gone.stop()
    export_id = str(uuid.uuid4())
    with transaction(sessions) as session:
        for attempt in range(5):
            add(session, ExportStarted(export_id=export_id, account="acme", attempt=attempt))

    down = OutboxRelay(
        settings=settings.model_copy(update={"kafka_bootstrap_servers": gone_address}),
        sessions=sessions,
        delivery_timeout_seconds=DEAD_BROKER_DELIVERY_TIMEOUT,
    )
    assert down.publish_pending() == 0
    assert down.publish_pending() == 0
    rows = outbox_rows(sessions)
    assert [row.published_at for row in rows] == [None] * 5
    assert [row.attempts for row in rows] == [2] * 5
    assert all(row.last_error for row in rows)
    assert down.failed == 10

    fresh = KafkaBroker(ready_file=tmp_path / "fresh.ready", pid_file=tmp_path / "fresh.pid")
    try:
        address = fresh.start()
        relay = OutboxRelay(
            settings=settings.model_copy(update={"kafka_bootstrap_servers": address}),
            sessions=sessions,
        )
        assert relay.publish_pending() == 5
        rows = outbox_rows(sessions)
        assert all(row.published_at is not None for row in rows)
        assert all(row.last_error is None for row in rows)

        messages = consume(address, [TOPIC_LIFECYCLE], until=lambda got: len(got) >= 5)
        started = [decode(m.value()) for m in messages]
        assert [e.attempt for e in started if isinstance(e, ExportStarted)] == [
            0,
            1,
            2,
            3,
            4,
        ]
        assert {m.key().decode() for m in messages} == {export_id}
    finally:
        fresh.stop()


@contextlib.contextmanager
def listening_relay(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[OutboxRelay]:
    """The relay running in a thread, listening (its fallback poll a minute: a quick publish can
    only come from LISTEN/NOTIFY); stopped on the way out, and its thread gone."""
    relay = OutboxRelay(settings=settings, sessions=sessions, idle_poll_seconds=60.0)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), name="relay", daemon=True)
    thread.start()
    try:
        assert relay.listening.wait(10)
        yield relay
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_run_wakes_up_on_notify(kafka_settings: Settings, sessions: sessionmaker[Session]) -> None:
    with listening_relay(kafka_settings, sessions) as relay:
        delays = []
        for _ in range(2):  # the first round also connects the producer
            with transaction(sessions) as session:
                add(session, ExportRequested(export_id=str(uuid.uuid4()), account="acme"))
            committed = time.monotonic()
            while any(row.published_at is None for row in outbox_rows(sessions)):
                assert time.monotonic() - committed < 10, "the relay did not publish"
                time.sleep(0.02)
            delays.append(time.monotonic() - committed)
        assert delays[-1] < 1.0, delays
        assert relay.published == 2
    assert not relay.listening.is_set()


def test_run_survives_a_dropped_listen_connection(
    kafka_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    with listening_relay(kafka_settings, sessions) as relay:
        with transaction(sessions) as session:
            killed = session.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
                )
            )
        assert killed == 1
        deadline = time.monotonic() + 10
        while relay.listening.is_set():
            assert time.monotonic() < deadline, "the relay did not notice the dropped connection"
            time.sleep(0.02)
        # Committed while nobody listens: picked up when the relay has reconnected.
        with transaction(sessions) as session:
            add(session, ExportRequested(export_id=str(uuid.uuid4()), account="acme"))
        assert relay.listening.wait(10)
        while any(row.published_at is None for row in outbox_rows(sessions)):
            assert time.monotonic() < deadline, "the relay did not publish after reconnecting"
            time.sleep(0.02)


def run_relay(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "services.relay"],
            env=python_env(env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def test_relay_entry_point_publishes_and_stops_on_sigterm(
    kafka_settings: Settings, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    log_path = tmp_path / "relay.log"
    env = {
        **os.environ,
        "DATABASE_URL": kafka_settings.database_url,
        "SECRET_KEY": kafka_settings.secret_key,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_settings.require("kafka_bootstrap_servers"),
    }
    relay = run_relay(env, log_path)
    try:
        deadline = time.monotonic() + 20
        while "outbox relay: started" not in log_path.read_text():
            assert relay.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the relay did not start"
            time.sleep(0.05)
        with transaction(sessions) as session:
            add(session, ExportRequested(export_id=str(uuid.uuid4()), account="acme"))
        while any(row.published_at is None for row in outbox_rows(sessions)):
            assert time.monotonic() < deadline, "the relay did not publish"
            time.sleep(0.05)
        assert terminate(relay, 15) == 0
    finally:
        kill_if_running(relay)


def test_relay_entry_point_refuses_to_start_without_kafka(
    settings: Settings, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env.update(DATABASE_URL=settings.database_url, SECRET_KEY=settings.secret_key)
    log_path = tmp_path / "relay.log"
    relay = run_relay(env, log_path)
    try:
        assert relay.wait(30) == 2
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
    assert log_path.read_text().strip() == (
        "outbox relay: missing required setting KAFKA_BOOTSTRAP_SERVERS"
    )
