"""Transactional outbox: events are written with the change that caused them, then relayed.

:func:`add` puts an event into the ``outbox`` table inside the caller's transaction, so the event
exists if and only if the change committed. :class:`OutboxRelay` publishes pending rows to Kafka
in id order and marks a row published only after the broker confirmed it (at-least-once: a crash
between the broker's acknowledgement and our commit publishes that row again; consumers are
idempotent). A trigger on ``outbox`` runs ``pg_notify('outbox', '')`` so the relay wakes up as
soon as such a transaction commits; a slow fallback poll covers missed notifications.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from confluent_kafka import KafkaError, KafkaException, Producer
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shared import metrics
from shared.db import libpq_url, transaction
from shared.events import TOPIC_DEAD_LETTER, TOPIC_LIFECYCLE, TOPIC_REQUESTED, Event
from shared.kafka import PRODUCER_MESSAGE_TIMEOUT_MS, producer_config, retry_delay
from shared.models import OutboxMessage
from shared.settings import Settings

log = logging.getLogger(__name__)

#: The channel the ``outbox`` trigger notifies.
NOTIFY_CHANNEL = "outbox"
#: Rows published per transaction.
DEFAULT_BATCH_SIZE = 500
#: How long the relay sleeps between two looks at the table without a notification (seconds).
DEFAULT_IDLE_POLL_SECONDS = 1.0
#: Longest single wait, so that a stop request is noticed quickly (seconds).
STOP_CHECK_SECONDS = 1.0
#: Extra time given to ``flush`` beyond the delivery timeout, so every report arrives (seconds).
FLUSH_MARGIN_SECONDS = 5.0
#: Longest ``last_error`` stored (characters).
LAST_ERROR_MAX_CHARS = 200


def add(session: Session, event: Event) -> None:
    """Queue ``event`` for publishing, in the caller's transaction."""
    session.add(OutboxMessage(topic=event.topic, key=event.key, payload=event.to_json()))


def pending_count(session: Session) -> int:
    """Rows not yet published (for the ``orders_export_outbox_pending`` gauge)."""
    count = session.scalar(
        select(func.count()).select_from(OutboxMessage).where(OutboxMessage.published_at.is_(None))
    )
    return int(count or 0)


def oldest_pending_at(session: Session) -> dt.datetime | None:
    """When the oldest unpublished row was written (None when there is none)."""
    return session.scalar(
        select(OutboxMessage.created_at)
        .where(OutboxMessage.published_at.is_(None))
        .order_by(OutboxMessage.id)
        .limit(1)
    )


def _short(text: str) -> str:
    return text if len(text) <= LAST_ERROR_MAX_CHARS else text[: LAST_ERROR_MAX_CHARS - 1] + "…"


class _Listener:
    """A dedicated autocommit connection that ``LISTEN``s on the outbox channel.

    It reconnects with backoff when the connection drops; while it is down the relay just
    polls. ``listening`` is set whenever ``LISTEN`` is in effect.
    """

    def __init__(self, *, database_url: str, listening: threading.Event) -> None:
        self._url = libpq_url(database_url)
        self._listening = listening
        self._conn: psycopg.Connection[Any] | None = None
        self._failures = 0
        self._next_attempt = 0.0

    def connect_if_due(self) -> bool:
        """(Re)connect and ``LISTEN`` unless connected or still backing off; never raises.

        True when a new connection is listening now (notifications sent while there was none
        are lost, so the caller should look at the table).
        """
        if self._conn is not None or time.monotonic() < self._next_attempt:
            return False
        try:
            conn = psycopg.connect(self._url, autocommit=True)
        except psycopg.Error as exc:
            self._failed(exc)
            return False
        try:
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except psycopg.Error as exc:
            conn.close()
            self._failed(exc)
            return False
        if self._failures:
            log.info("outbox relay: LISTEN connection is back")
        self._conn = conn
        self._failures = 0
        self._listening.set()
        return True

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        """Block up to ``timeout`` s for a notification (or ``stop``); True when notified."""
        if self._conn is None:
            stop.wait(timeout)
            return False
        try:
            notified = any(True for _ in self._conn.notifies(timeout=timeout, stop_after=1))
            if notified:
                # Swallow the burst that often follows (one per committed transaction); the
                # caller reads the table once for all of them.
                for _ in self._conn.notifies(timeout=0.0):
                    pass
        except psycopg.Error as exc:
            self.close()
            self._failed(exc)
            return False
        return notified

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        delay = retry_delay(self._failures)
        self._next_attempt = time.monotonic() + delay
        log.warning(
            "outbox relay: LISTEN connection unavailable (%s); polling, reconnect in %.1f s",
            type(exc).__name__,
            delay,
        )

    def close(self) -> None:
        self._listening.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()


#: How long the start-up topic warm-up may wait for the broker (seconds).
WARM_UP_TIMEOUT_SECONDS = 5.0


class OutboxRelay:
    """Publishes pending outbox rows to Kafka, oldest first, until stopped.

    When the broker is down, rows stay pending (``attempts`` and ``last_error`` record why) and
    the relay backs off; when it is back, the backlog drains in id order. Several relays may
    run: ``FOR UPDATE SKIP LOCKED`` gives each row to one of them at a time.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        batch_size: int = DEFAULT_BATCH_SIZE,
        delivery_timeout_seconds: float = PRODUCER_MESSAGE_TIMEOUT_MS / 1000,
        idle_poll_seconds: float = DEFAULT_IDLE_POLL_SECONDS,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.settings = settings
        self.sessions = sessions
        self.batch_size = batch_size
        self.delivery_timeout_seconds = delivery_timeout_seconds
        self.idle_poll_seconds = idle_poll_seconds
        #: Set while the LISTEN connection is up (tests wait for it).
        self.listening = threading.Event()
        #: Counters for metrics: rows published, and failed delivery attempts.
        self.published = 0
        self.failed = 0
        self._producer: Any = None

    def _get_producer(self) -> Any:
        if self._producer is None:
            config = producer_config(self.settings)
            config["message.timeout.ms"] = int(self.delivery_timeout_seconds * 1000)
            self._producer = Producer(config)
        return self._producer

    def _warm_up_topics(self) -> None:
        """Ask for the topics' metadata once at start: a broker that creates topics on first use
        (the local in-memory one) has them before the first export, so consumers that subscribed
        at start do not wait for their next metadata refresh. Redpanda has them already."""
        try:
            producer = self._get_producer()
            for topic in (TOPIC_REQUESTED, TOPIC_LIFECYCLE, TOPIC_DEAD_LETTER):
                producer.list_topics(topic=topic, timeout=WARM_UP_TIMEOUT_SECONDS)
        except Exception as exc:  # a down broker is the normal outage path, handled later
            log.info("outbox relay: topic warm-up skipped (%s)", type(exc).__name__)

    def publish_pending(self) -> int:
        """Publish one batch of pending rows; return how many the broker confirmed."""
        published, _ = self._publish_batch()
        return published

    def _publish_batch(self) -> tuple[int, int]:
        """One batch in one transaction; (published, failed)."""
        with transaction(self.sessions) as session:
            rows = session.scalars(
                select(OutboxMessage)
                .where(OutboxMessage.published_at.is_(None))
                .order_by(OutboxMessage.id)
                .limit(self.batch_size)
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return 0, 0
            producer = self._get_producer()
            outcomes: dict[int, str | None] = {}
            fatal = False

            def reporter(row_id: int) -> Callable[[Any, Any], None]:
                def on_delivery(err: Any, _msg: Any) -> None:
                    nonlocal fatal
                    outcomes[row_id] = None if err is None else f"{err.name()}: {err.str()}"
                    fatal = fatal or (err is not None and bool(err.fatal()))

                return on_delivery

            for row in rows:
                value = json.dumps(row.payload, separators=(",", ":")).encode()
                try:
                    producer.produce(
                        row.topic, value=value, key=row.key.encode(), on_delivery=reporter(row.id)
                    )
                except BufferError:
                    outcomes[row.id] = "local producer queue full"
                except KafkaException as exc:
                    error: Any = exc.args[0] if exc.args else None
                    if isinstance(error, KafkaError):
                        outcomes[row.id] = f"produce failed: {error.name()}"
                        fatal = fatal or bool(error.fatal())
                    else:
                        outcomes[row.id] = f"produce failed: {type(exc).__name__}"
            producer.flush(self.delivery_timeout_seconds + FLUSH_MARGIN_SECONDS)

            now = dt.datetime.now(dt.UTC)
            published = failed = 0
            for row in rows:
                if row.id in outcomes and outcomes[row.id] is None:
                    row.published_at = now
                    row.last_error = None
                    published += 1
                else:
                    row.attempts += 1
                    row.last_error = _short(outcomes.get(row.id) or "delivery not confirmed")
                    failed += 1
        if fatal:
            # A fatal (idempotence) error poisons the producer: start over with a new one.
            log.error("outbox relay: fatal producer error; recreating the producer")
            self._producer = None
        self.published += published
        self.failed += failed
        metrics.OUTBOX_PUBLISHED.inc(published)
        metrics.OUTBOX_DELIVERY_FAILURES.inc(failed)
        if failed:
            log.warning("outbox relay: %d of %d messages not delivered", failed, len(rows))
        return published, failed

    def _drain(self, stop: threading.Event) -> int:
        """Publish batches until the table is drained or a delivery failed; failures count."""
        while not stop.is_set():
            published, failed = self._publish_batch()
            if failed:
                return failed
            if published < self.batch_size:
                return 0
        return 0

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set; never raises for broker or database outages."""
        listener = _Listener(database_url=self.settings.database_url, listening=self.listening)
        failures = 0
        self._warm_up_topics()
        try:
            while not stop.is_set():
                # LISTEN first, then look at the table: nothing committed in between is missed.
                listener.connect_if_due()
                try:
                    failed = self._drain(stop)
                except Exception as exc:
                    log.warning("outbox relay: publishing failed (%s)", type(exc).__name__)
                    failed = 1
                if failed:
                    failures += 1
                    stop.wait(retry_delay(failures))
                    continue
                failures = 0
                self._idle(listener, stop)
        finally:
            listener.close()
            if self._producer is not None:
                self._producer.flush(FLUSH_MARGIN_SECONDS)
                self._producer = None
            log.info(
                "outbox relay: stopped (published %d, delivery failures %d)",
                self.published,
                self.failed,
            )

    def _idle(self, listener: _Listener, stop: threading.Event) -> None:
        """Wait for a notification, a stop request, or the fallback poll interval."""
        deadline = time.monotonic() + self.idle_poll_seconds
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if listener.wait(stop, min(remaining, STOP_CHECK_SECONDS)):
                return
            if listener.connect_if_due():
                return
