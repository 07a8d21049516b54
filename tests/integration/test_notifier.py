"""The notifier against real PostgreSQL, a real SMTP sink and a real Kafka-protocol broker."""

from __future__ import annotations

import dataclasses
import datetime as dt
import email
import email.policy
import hashlib
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import pytest
from confluent_kafka import Producer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.db import transaction
from shared.devstack.children import python_env
from shared.devstack.mailsink import MailSink
from shared.devstack.ports import free_port
from shared.events import (
    TOPIC_LIFECYCLE,
    ExportFailed,
    ExportReady,
    ExportStarted,
)
from shared.filters import parse_filter_object
from shared.identity import (
    ensure_account,
    get_account,
    remove_membership,
    set_membership,
    upsert_user,
)
from shared.kafka import ConsumerLoop
from shared.models import ErrorClass, ExportJob, ExportState, Notification, Role, User
from shared.notifications import NotificationFailed, Notifier
from shared.settings import Settings
from shared.signing import SigningKeys, verify
from tests.support.kafka import dead_letter
from tests.support.processes import kill_if_running, terminate

PUBLIC_URL = "http://exports.example.test:8080/"
TIMEZONE = "Europe/Berlin"
FILTERS = {"status": ["paid"], "placed_from": "2025-01-01", "placed_to": "2025-03-31"}
FILTER_SUMMARY = "status paid; placed 2025-01-01 to 2025-03-31"
ROWS = 50_000
SIZE_BYTES = 12_345_678
FAILURE_MESSAGE = "The export took too long. Please choose a shorter date range."
#: Consumer session timeout for the mock cluster (ms).
TEST_SESSION_TIMEOUT_MS = 6000
#: Longest wait for something to arrive through Kafka (seconds).
ARRIVAL_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class People:
    slug: str
    account_id: int
    user_id: int
    email: str


def make_people(sessions: sessionmaker[Session]) -> People:
    slug = f"acme-{uuid.uuid4().hex[:8]}"
    address = f"ada@{slug}.test"
    with transaction(sessions) as session:
        account = ensure_account(session, slug=slug, name="Acme Corp", timezone=TIMEZONE)
        user = upsert_user(
            session, email=address, password="correct horse battery", display_name="Ada Ådmin"
        )
        set_membership(session, account=account, user=user, role=Role.ADMIN)
        return People(slug=slug, account_id=account.id, user_id=user.id, email=address)


def make_job(sessions: sessionmaker[Session], people: People, *, outcome: ExportState) -> uuid.UUID:
    """An export that went queued -> running -> ``outcome`` (the trigger allows only that)."""
    now = dt.datetime.now(dt.UTC)
    with transaction(sessions) as session:
        job = ExportJob(
            account_id=people.account_id,
            requested_by=people.user_id,
            state=ExportState.QUEUED,
            filters=parse_filter_object(FILTERS).to_snapshot(),
            filters_digest=hashlib.sha256(uuid.uuid4().bytes).hexdigest(),
            column_set_version=1,
            timezone=TIMEZONE,
            max_attempts=3,
        )
        session.add(job)
        session.flush()
        job.state = ExportState.RUNNING
        job.attempts = 1
        job.started_at = now
        session.flush()
        job.state = outcome
        job.finished_at = now
        if outcome == ExportState.READY:
            job.row_count = ROWS
            job.rows_written = ROWS
            job.size_bytes = SIZE_BYTES
            job.sha256 = "0" * 64
            job.file_name = "orders-acme-20250101-1200.csv"
            job.storage_key = f"exports/{job.id}.csv"
            job.expires_at = now + dt.timedelta(days=7)
        else:
            job.error_code = "statement_timeout"
            job.error_message = FAILURE_MESSAGE
            job.error_class = ErrorClass.USER
        return job.id


def ready_event(export_id: uuid.UUID, people: People) -> ExportReady:
    return ExportReady(
        export_id=str(export_id),
        account=people.slug,
        requested_by=people.user_id,
        row_count=ROWS,
        size_bytes=SIZE_BYTES,
        expires_at=(dt.datetime.now(dt.UTC) + dt.timedelta(days=7)).isoformat(),
    )


def failed_event(export_id: uuid.UUID, people: People, *, final: bool) -> ExportFailed:
    return ExportFailed(
        export_id=str(export_id),
        account=people.slug,
        requested_by=people.user_id,
        code="statement_timeout",
        message=FAILURE_MESSAGE,
        retryable=False,
        final=final,
    )


def read_mail(path: Path) -> EmailMessage:
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def body_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())


def notification(sessions: sessionmaker[Session], export_id: uuid.UUID, kind: str) -> Notification:
    with transaction(sessions) as session:
        row = session.get(Notification, (export_id, kind))
        assert row is not None
        return row


def wait_until(condition: Callable[[], bool], *, what: str) -> None:
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start_sink(root: Path, name: str) -> MailSink:
    sink = MailSink(
        mail_dir=root / f"{name}-mail",
        ready_file=root / f"{name}.ready",
        pid_file=root / f"{name}.pid",
    )
    try:
        sink.start()
    except BaseException:
        sink.stop()
        raise
    return sink


def with_mail(settings: Settings, sink: MailSink, **extra: Any) -> Settings:
    return settings.model_copy(update={"smtp_url": sink.url, "public_url": PUBLIC_URL, **extra})


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[MailSink]:
    mail = start_sink(tmp_path, "sink")
    try:
        yield mail
    finally:
        mail.stop()


@pytest.fixture
def notifier(settings: Settings, sink: MailSink, sessions: sessionmaker[Session]) -> Notifier:
    return Notifier(settings=with_mail(settings, sink), sessions=sessions)


@pytest.fixture
def people(sessions: sessionmaker[Session]) -> People:
    return make_people(sessions)


def test_ready_email_is_sent_once(
    notifier: Notifier,
    sink: MailSink,
    sessions: sessionmaker[Session],
    settings: Settings,
    people: People,
) -> None:
    export_id = make_job(sessions, people, outcome=ExportState.READY)
    event = ready_event(export_id, people)
    sent_before = dt.datetime.now(dt.UTC)

    notifier.handle(event)

    [path] = sink.messages()
    message = read_mail(path)
    assert message["To"].addresses[0].addr_spec == people.email
    assert message["From"] == settings.smtp_from
    assert message["Subject"] == f"Your orders export is ready ({people.slug}, 50,000 rows)"
    assert message["Message-ID"] == f"<orders-export.{export_id}.ready@orders-export.invalid>"
    body = body_of(message)
    assert FILTER_SUMMARY in body
    assert "50,000" in body
    assert "12.3 MB" in body
    with transaction(sessions) as session:
        job = session.get(ExportJob, export_id)
        assert job is not None and job.expires_at is not None
        expires_at = job.expires_at
    # Moments in the account's time zone, with its name (as on the web pages)
    local = expires_at.astimezone(ZoneInfo(TIMEZONE)).strftime("%Y-%m-%d %H:%M")
    assert f"Available until: {local} {TIMEZONE}" in body

    [link] = [line for line in body.splitlines() if line.startswith(PUBLIC_URL.rstrip("/"))]
    assert f"/exports/{export_id}/download?expires=" in link
    assert "signature=" in link
    assert link.encode() in path.read_bytes()  # one unwrapped line, also in the raw message
    assert "Hello Ada Ådmin," in body
    query = parse_qs(urlsplit(link).query)
    expires, signature = query["expires"][0], query["signature"][0]
    assert int(expires) <= int(expires_at.timestamp())
    verify(
        SigningKeys.from_settings(settings),
        export_id=str(export_id),
        user_id=people.user_id,
        expires=expires,
        signature=signature,
    )

    # The HTML alternative: the same link behind a button, nothing fetched from elsewhere
    assert message.get_content_type() == "multipart/alternative"
    html_part = message.get_body(preferencelist=("html",))
    assert html_part is not None
    html = str(html_part.get_content())
    assert f'href="{link.replace("&", "&amp;")}"' in html and "Download CSV" in html
    assert "<img" not in html and "src=" not in html and "url(" not in html
    assert "Ada Ådmin" in html and FILTER_SUMMARY in html

    row = notification(sessions, export_id, "ready")
    assert row.status == "sent"
    assert row.sent_at is not None and row.sent_at >= sent_before
    assert (row.recipient, row.event_id, row.attempts) == (people.email, event.event_id, 0)

    # Redelivered, and re-published with a new event id: nothing more is sent.
    notifier.handle(event)
    notifier.handle(dataclasses.replace(event, event_id=str(uuid.uuid4())))
    assert len(sink.messages()) == 1
    assert notifier.outcomes[("ready", "sent")] == 1
    assert notifier.outcomes[("ready", "duplicate")] == 2


def test_smtp_down_is_retried_and_sends_once_when_back(
    settings: Settings, sessions: sessionmaker[Session], people: People, tmp_path: Path
) -> None:
    export_id = make_job(sessions, people, outcome=ExportState.READY)
    event = ready_event(export_id, people)
    gone = start_sink(tmp_path, "gone")
    gone.stop()
    down = Notifier(settings=with_mail(settings, gone), sessions=sessions)

    for attempt in (1, 2):
        with pytest.raises(NotificationFailed):
            down.handle(event)
        row = notification(sessions, export_id, "ready")
        assert row.sent_at is None and row.status == "pending"
        assert row.attempts == attempt
        assert row.last_error is not None
        assert row.last_error.startswith("SMTP delivery failed")
    assert gone.messages() == []

    back = start_sink(tmp_path, "back")
    try:
        notifier = Notifier(settings=with_mail(settings, back), sessions=sessions)
        notifier.handle(event)
        notifier.handle(event)
        assert len(back.messages()) == 1
    finally:
        back.stop()
    row = notification(sessions, export_id, "ready")
    assert row.sent_at is not None
    assert row.attempts == 2
    assert row.last_error is None


def test_final_failure_sends_one_failure_email(
    notifier: Notifier, sink: MailSink, sessions: sessionmaker[Session], people: People
) -> None:
    export_id = make_job(sessions, people, outcome=ExportState.FAILED)

    notifier.handle(failed_event(export_id, people, final=True))
    notifier.handle(failed_event(export_id, people, final=True))

    [path] = sink.messages()
    message = read_mail(path)
    assert message["To"].addresses[0].addr_spec == people.email
    assert message["Subject"] == f"Your orders export failed ({people.slug})"
    body = body_of(message)
    assert FAILURE_MESSAGE in body
    assert FILTER_SUMMARY in body
    assert f"{PUBLIC_URL.rstrip('/')}/exports/{export_id}" in body.splitlines()
    assert "download" not in body
    assert notification(sessions, export_id, "failed").sent_at is not None


def test_non_final_failures_and_other_events_send_nothing(
    notifier: Notifier, sink: MailSink, sessions: sessionmaker[Session], people: People
) -> None:
    export_id = make_job(sessions, people, outcome=ExportState.FAILED)

    notifier.handle(failed_event(export_id, people, final=False))
    notifier.handle(ExportStarted(export_id=str(export_id), account=people.slug, attempt=2))

    assert sink.messages() == []
    with transaction(sessions) as session:
        rows = session.scalars(select(Notification).where(Notification.export_id == export_id))
        assert list(rows) == []


def test_exports_made_inside_the_request_send_no_email(
    notifier: Notifier, sink: MailSink, sessions: sessionmaker[Session], people: People
) -> None:
    export_id = make_job(sessions, people, outcome=ExportState.READY)
    event = ready_event(export_id, people)
    notifier.handle(dataclasses.replace(event, notify=False))
    assert sink.messages() == []


@pytest.mark.parametrize("change", ["membership removed", "demoted to member", "deactivated"])
def test_no_email_when_the_requester_is_no_longer_an_admin(
    notifier: Notifier, sink: MailSink, sessions: sessionmaker[Session], change: str
) -> None:
    people = make_people(sessions)
    export_id = make_job(sessions, people, outcome=ExportState.READY)
    with transaction(sessions) as session:
        account = get_account(session, people.slug)
        user = session.get(User, people.user_id)
        assert user is not None
        if change == "membership removed":
            assert remove_membership(session, account=account, user=user)
        elif change == "demoted to member":
            set_membership(session, account=account, user=user, role=Role.MEMBER)
        else:
            user.is_active = False

    notifier.handle(ready_event(export_id, people))
    notifier.handle(ready_event(export_id, people))

    assert sink.messages() == []
    row = notification(sessions, export_id, "ready")
    assert row.sent_at is None
    assert row.attempts == 0
    assert (row.status, row.last_error) == ("skipped", "recipient no longer an admin")


def test_end_to_end_through_kafka_with_redelivery_and_garbage(
    settings: Settings,
    sessions: sessionmaker[Session],
    sink: MailSink,
    people: People,
    broker: str,
) -> None:
    export_id = make_job(sessions, people, outcome=ExportState.READY)
    event = ready_event(export_id, people)
    loop_settings = with_mail(
        settings, sink, kafka_bootstrap_servers=broker, kafka_session_timeout_ms=6000
    )
    loop = Notifier(settings=loop_settings, sessions=sessions).consumer_loop()
    producer = Producer({"bootstrap.servers": broker})

    def publish(
        key: bytes, value: bytes, headers: list[tuple[str, str | bytes | None]] | None = None
    ) -> None:
        producer.produce(TOPIC_LIFECYCLE, key=key, value=value, headers=headers or [])
        assert producer.flush(10) == 0

    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), name="notifier", daemon=True)
    thread.start()
    try:
        publish(str(export_id).encode(), event.encode())
        wait_until(lambda: len(sink.messages()) == 1, what="the ready email")

        garbage = b"\x00 this is not an event"
        publish(str(export_id).encode(), event.encode())
        publish(b"garbage", garbage, [("trace-id", b"abc")])
        wait_until(lambda: loop.dead_lettered == 1 and loop.handled == 2, what="both messages")
    finally:
        stop.set()
        thread.join(20)
    assert not thread.is_alive()
    assert len(sink.messages()) == 1
    assert loop.failed == 0

    dead = dead_letter(broker, timeout=ARRIVAL_TIMEOUT)
    assert (dead.key(), dead.value()) == (b"garbage", garbage)
    headers = dict(dead.headers())
    assert headers["trace-id"] == b"abc"
    assert re.match(rb"undecodable event", headers["error"])
    assert headers["source-topic"] == TOPIC_LIFECYCLE.encode()


def test_a_failing_message_is_retried_in_order_until_it_succeeds(
    settings: Settings,
    sessions: sessionmaker[Session],
    people: People,
    broker: str,
    tmp_path: Path,
) -> None:
    export_id = make_job(sessions, people, outcome=ExportState.READY)
    port = free_port()
    late = MailSink(
        mail_dir=tmp_path / "late-mail",
        ready_file=tmp_path / "late.ready",
        pid_file=tmp_path / "late.pid",
        port=port,
    )
    loop_settings = settings.model_copy(
        update={
            "smtp_url": f"smtp://127.0.0.1:{port}",  # nothing listens there yet
            "public_url": PUBLIC_URL,
            "kafka_bootstrap_servers": broker,
            "kafka_session_timeout_ms": TEST_SESSION_TIMEOUT_MS,
        }
    )
    notifier = Notifier(settings=loop_settings, sessions=sessions)
    topic = f"test.retry.{uuid.uuid4().hex}"
    loop = ConsumerLoop(
        settings=loop_settings,
        group_id=f"test-{uuid.uuid4().hex}",
        topics=[topic],
        handle=notifier.handle,
        name="retry-test",
    )
    producer = Producer({"bootstrap.servers": broker})
    key = str(export_id).encode()
    producer.produce(topic, key=key, value=ready_event(export_id, people).encode())
    # Same key, same partition: must wait behind the failing message.
    later = ExportStarted(export_id=str(export_id), account=people.slug, attempt=2)
    producer.produce(topic, key=key, value=later.encode())
    assert producer.flush(10) == 0

    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), name="retry-test", daemon=True)
    thread.start()
    try:
        wait_until(lambda: loop.failed >= 2, what="two failed attempts")
        assert loop.handled == 0
        late.start()
        wait_until(lambda: loop.handled == 2, what="both messages handled")
        assert len(late.messages()) == 1
    finally:
        stop.set()
        thread.join(20)
        late.stop()
    assert not thread.is_alive()
    row = notification(sessions, export_id, "ready")
    assert row.sent_at is not None
    assert row.attempts >= 2


def test_notifier_entry_point_sends_and_stops_on_sigterm(
    settings: Settings,
    sessions: sessionmaker[Session],
    sink: MailSink,
    people: People,
    broker: str,
    tmp_path: Path,
) -> None:
    export_id = make_job(sessions, people, outcome=ExportState.READY)
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "SECRET_KEY": settings.secret_key,
        "KAFKA_BOOTSTRAP_SERVERS": broker,
        "KAFKA_SESSION_TIMEOUT_MS": str(TEST_SESSION_TIMEOUT_MS),
        "SMTP_URL": str(sink.url),
        "PUBLIC_URL": PUBLIC_URL,
    }
    log_path = tmp_path / "notifier.log"
    with log_path.open("wb") as log_file:
        notifier = subprocess.Popen(
            [sys.executable, "-m", "services.notifier"],
            env=python_env(env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        producer = Producer({"bootstrap.servers": broker})
        event = ready_event(export_id, people)
        producer.produce(TOPIC_LIFECYCLE, key=str(export_id).encode(), value=event.encode())
        assert producer.flush(10) == 0
        wait_until(lambda: len(sink.messages()) == 1, what="the email from the notifier process")
        assert terminate(notifier, 20) == 0
    finally:
        kill_if_running(notifier)
    assert "notifier: started" in log_path.read_text()
    assert read_mail(sink.messages()[0])["To"].addresses[0].addr_spec == people.email


def test_ready_email_says_which_options_the_export_used(
    notifier: Notifier, sink: MailSink, sessions: sessionmaker[Session], people: People
) -> None:
    plain = make_job(sessions, people, outcome=ExportState.READY)
    packed = make_job(sessions, people, outcome=ExportState.READY)
    with transaction(sessions) as session:
        job = session.get_one(ExportJob, packed)
        job.utf8_bom, job.compression = True, "gzip"
        job.file_name = "orders-acme-20250101-1200.csv.gz"
    notifier.handle(ready_event(plain, people))
    notifier.handle(ready_event(packed, people))
    bodies = [body_of(read_mail(path)) for path in sink.messages()]
    options = sorted(line for body in bodies for line in body.splitlines() if "Options:" in line)
    assert options == [
        "Options:   Excel-friendly (UTF-8 BOM), Compressed (.csv.gz)",
        "Options:   none",
    ]
