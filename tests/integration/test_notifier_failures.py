"""The notifier when the mail server says no, against real SMTP servers (aiosmtpd over TCP), a
real Kafka-protocol broker and PostgreSQL: a permanent refusal is final at once and never holds
up the other users' emails; a transient one is retried for a bounded time, then dead-lettered;
a failed QUIT after the server accepted the message is not a failure; user-controlled text
cannot break the message's line limits."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP
from confluent_kafka import Producer
from prometheus_client import REGISTRY
from sqlalchemy.orm import Session, sessionmaker

from shared.db import transaction
from shared.devstack.ports import free_port
from shared.emails import MAX_SUMMARY_CHARS
from shared.events import TOPIC_LIFECYCLE, ExportReady
from shared.filters import MAX_Q_LENGTH, OrderFilters
from shared.identity import ensure_account, set_membership, upsert_user
from shared.kafka import ConsumerLoop
from shared.models import ORDER_CHANNELS, ORDER_STATUSES, ExportState, Notification, Role
from shared.notifications import Notifier
from shared.settings import Settings
from tests.support.jobs import make_job
from tests.support.kafka import dead_letter
from tests.support.waiting import wait_until

PUBLIC_URL = "http://exports.example.test"
#: Consumer session timeout for the mock cluster (ms).
SESSION_TIMEOUT_MS = 6000


class Recorder:
    """aiosmtpd handler: stores accepted messages; answers ``refusals[recipient]`` at DATA."""

    def __init__(self) -> None:
        self.refusals: dict[str, str] = {}
        self.received: list[tuple[list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        for rcpt in envelope.rcpt_tos:
            if rcpt in self.refusals:
                return self.refusals[rcpt]
        with self.lock:
            self.received.append((list(envelope.rcpt_tos), envelope.original_content))
        return "250 OK"

    def recipients(self) -> list[str]:
        with self.lock:
            return [r for rcpts, _ in self.received for r in rcpts]


class QuitFails(SMTP):
    """Accepts the message, then answers QUIT with an error (and hangs up)."""

    async def smtp_QUIT(self, arg: str) -> None:
        await self.push("421 4.3.0 closing, something broke")
        assert self.transport is not None
        self.transport.close()


class QuitFailsController(Controller):
    def factory(self) -> SMTP:
        return QuitFails(self.handler, **self.SMTP_kwargs)


def start_smtp(handler: Recorder, controller: type[Controller] = Controller) -> Controller:
    server = controller(handler, hostname="127.0.0.1", port=free_port(), enable_SMTPUTF8=False)
    server.start()
    return server


def smtp_url(server: Controller) -> str:
    return f"smtp://127.0.0.1:{server.port}"


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def smtp(recorder: Recorder) -> Iterator[Controller]:
    server = start_smtp(recorder)
    try:
        yield server
    finally:
        server.stop()


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def ready_export(
    sessions: sessionmaker[Session],
    address: str,
    *,
    display_name: str | None = None,
    account_name: str | None = None,
    filters: OrderFilters | None = None,
) -> ExportReady:
    """A ready export of a fresh account whose admin is ``address``, and its event."""
    slug = f"n-{uuid.uuid4().hex[:10]}"
    with transaction(sessions) as session:
        account = ensure_account(session, slug=slug, name=account_name or slug, timezone="UTC")
        user = upsert_user(
            session, email=address, password="long-enough-pw", display_name=display_name
        )
        set_membership(session, account=account, user=user, role=Role.ADMIN)
        account_id, user_id = account.id, user.id
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=7)
    export_id = make_job(
        sessions,
        account_id=account_id,
        user_id=user_id,
        state=ExportState.READY,
        filters=filters,
        row_count=10,
        size_bytes=1000,
        expires_at=expires,
        storage_key="k",
    )
    return ExportReady(
        export_id=str(export_id),
        account=slug,
        requested_by=user_id,
        row_count=10,
        size_bytes=1000,
        expires_at=expires.isoformat(),
    )


def row_of(sessions: sessionmaker[Session], event: ExportReady) -> Notification:
    with sessions() as session:
        return session.get_one(Notification, (uuid.UUID(event.export_id), "ready"))


def run_loop(loop: ConsumerLoop) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), name=loop.name, daemon=True)
    thread.start()
    return stop, thread


def publish(broker: str, topic: str, events: list[ExportReady]) -> None:
    producer = Producer({"bootstrap.servers": broker})
    for event in events:  # one partition: every message waits behind the ones before it
        producer.produce(topic, key=event.key.encode(), value=event.encode(), partition=0)
    assert producer.flush(10) == 0


def test_permanent_refusals_are_final_at_once_and_hold_up_no_one(
    settings: Settings,
    sessions: sessionmaker[Session],
    smtp: Controller,
    recorder: Recorder,
    broker: str,
) -> None:
    # Given a mail server that answers 554 to one recipient's DATA, and no SMTPUTF8 for another
    run = uuid.uuid4().hex[:6]
    refused = f"refused-{run}@example.test"
    recorder.refusals[refused] = "554 5.7.1 Message rejected"
    others = [f"user{i}-{run}@example.test" for i in range(8)]
    events = [ready_export(sessions, refused), ready_export(sessions, f"jürgen-{run}@bücher.test")]
    events += [ready_export(sessions, address) for address in others]
    loop_settings = settings.model_copy(
        update={
            "smtp_url": smtp_url(smtp),
            "public_url": PUBLIC_URL,
            "kafka_bootstrap_servers": broker,
            "kafka_session_timeout_ms": SESSION_TIMEOUT_MS,
        }
    )
    notifier = Notifier(settings=loop_settings, sessions=sessions)
    topic = TOPIC_LIFECYCLE  # the notifier's own loop (this module has a broker of its own)
    loop = notifier.consumer_loop()
    failed_before = counter("orders_export_notifications_total", kind="ready", outcome="failed")
    # When the refused ones come first on the partition
    publish(broker, topic, events)
    stop, thread = run_loop(loop)
    try:
        # Then the eight other users' emails all arrive
        wait_until(lambda: sorted(recorder.recipients()) == sorted(others), what="eight emails")
        wait_until(lambda: loop.handled == len(events), what="every message handled")
    finally:
        stop.set()
        thread.join(20)
    # And the two refused emails are final at once, with a safe reason, never retried
    assert loop.failed == 0 and loop.dead_lettered == 0
    first, second = row_of(sessions, events[0]), row_of(sessions, events[1])
    assert first.sent_at is None and (first.status, first.last_error) == (
        "failed",
        "the mail server refused the message (554)",
    )
    assert second.sent_at is None and second.last_error is not None
    assert second.status == "failed" and "SMTPUTF8" in second.last_error
    assert (first.attempts, second.attempts) == (1, 1)
    assert notifier.outcomes[("ready", "failed")] == 2
    assert notifier.outcomes[("ready", "sent")] == 8
    assert counter("orders_export_notifications_total", kind="ready", outcome="failed") == (
        failed_before + 2
    )
    # A redelivery sends nothing and counts a duplicate
    notifier.handle(events[0])
    assert notifier.outcomes[("ready", "duplicate")] == 1 and len(recorder.received) == 8


def test_an_event_that_always_fails_is_dead_lettered_after_the_bound(
    settings: Settings,
    sessions: sessionmaker[Session],
    smtp: Controller,
    recorder: Recorder,
    broker: str,
) -> None:
    # Given a mail server that answers 451 (try again later) to one recipient, for ever
    run = uuid.uuid4().hex[:6]
    stuck = f"stuck-{run}@example.test"
    recorder.refusals[stuck] = "451 4.3.0 Try again later"
    events = [ready_export(sessions, stuck), ready_export(sessions, f"next-{run}@example.test")]
    loop_settings = settings.model_copy(
        update={
            "smtp_url": smtp_url(smtp),
            "public_url": PUBLIC_URL,
            "kafka_bootstrap_servers": broker,
            "kafka_session_timeout_ms": SESSION_TIMEOUT_MS,
            "consumer_max_retry_seconds": 3,
        }
    )
    notifier = Notifier(settings=loop_settings, sessions=sessions)
    topic = TOPIC_LIFECYCLE  # the notifier's own loop (this module has a broker of its own)
    loop = notifier.consumer_loop()
    publish(broker, topic, events)
    stop, thread = run_loop(loop)
    try:
        # Then it is retried with backoff, then dead-lettered, and the next email goes out
        wait_until(lambda: recorder.recipients() == [f"next-{run}@example.test"], what="next")
        wait_until(lambda: loop.handled == 1 and loop.dead_lettered == 1, what="both handled")
    finally:
        stop.set()
        thread.join(20)
    assert loop.failed >= 2  # retried before giving up
    row = row_of(sessions, events[0])
    assert row.sent_at is None and row.attempts >= 2
    assert row.status == "failed" and (row.last_error or "").startswith("gave up")
    assert notifier.outcomes[("ready", "failed")] == 1
    # And the message is on the dead-letter topic, untouched, saying why
    dead = dead_letter(broker, timeout=30, value=events[0].encode())
    headers = dict(dead.headers())
    assert headers["source-topic"] == topic.encode()
    assert b"NotificationFailed" in headers["error"]


def test_a_failed_quit_after_the_message_was_accepted_is_not_a_failure(
    settings: Settings, sessions: sessionmaker[Session], recorder: Recorder
) -> None:
    # Given a server that accepts the message (250 after DATA) but answers QUIT with 421
    server = start_smtp(recorder, QuitFailsController)
    try:
        notifier = Notifier(
            settings=settings.model_copy(
                update={"smtp_url": smtp_url(server), "public_url": PUBLIC_URL}
            ),
            sessions=sessions,
        )
        event = ready_export(sessions, f"quit-{uuid.uuid4().hex[:6]}@example.test")
        # When the notifier sends it, and the event is redelivered
        notifier.handle(event)
        notifier.handle(event)
    finally:
        server.stop()
    # Then it was sent once, recorded as sent, never retried
    assert len(recorder.received) == 1
    row = row_of(sessions, event)
    assert row.sent_at is not None and (row.attempts, row.last_error) == (0, None)
    assert notifier.outcomes[("ready", "sent")] == 1
    assert notifier.outcomes[("ready", "failed")] == 0


def test_user_controlled_text_cannot_break_the_line_limit(
    settings: Settings, sessions: sessionmaker[Session], smtp: Controller, recorder: Recorder
) -> None:
    # Given a filter whose summary is as long as the filter rules allow (every status and
    # channel, a 200-character search of 3-octet characters, both totals), and a long name and
    # account name
    longest = OrderFilters(
        status=ORDER_STATUSES,
        channel=ORDER_CHANNELS,
        q="€" * MAX_Q_LENGTH,
        min_total=Decimal("1234567890.12"),
        max_total=Decimal("9999999999.99"),
    )
    assert len(longest.summary()) > MAX_SUMMARY_CHARS
    event = ready_export(
        sessions,
        f"long-{uuid.uuid4().hex[:6]}@example.test",
        display_name="Ada " * 800,
        account_name="Acme " * 800,
        filters=longest,
    )
    notifier = Notifier(
        settings=settings.model_copy(update={"smtp_url": smtp_url(smtp), "public_url": PUBLIC_URL}),
        sessions=sessions,
    )
    notifier.handle(event)
    [(_, raw)] = recorder.received
    # Then every line of the message is within RFC 5322's 998 octets, and the text is shortened
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    message = email.message_from_bytes(raw, policy=email.policy.default)
    body = message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    [filters_line] = [line for line in body.splitlines() if line.startswith("Filters:")]
    assert len(filters_line) <= 300 and filters_line.endswith("…")
    assert f"{PUBLIC_URL}/exports/{event.export_id}/download?" in body
