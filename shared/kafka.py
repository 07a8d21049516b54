"""confluent-kafka plumbing shared by every service: client configs and the consumer loop.

Delivery is at-least-once: a consumer stores a message's offset only after its handler
succeeded (``enable.auto.offset.store`` off; the stored offsets are auto-committed), so a crash
or a failing handler means the message is seen again. Handlers must therefore be idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from shared import metrics
from shared.errors import OrdersExportError, UndecodableEvent
from shared.events import TOPIC_DEAD_LETTER, Event, decode
from shared.settings import Settings

log = logging.getLogger(__name__)
#: librdkafka's own log lines (connection failures, rebalances) go to this logger.
librdkafka_log = logging.getLogger("shared.kafka.librdkafka")

#: How long a produced message may wait for the broker before its delivery fails (ms).
PRODUCER_MESSAGE_TIMEOUT_MS = 15_000
#: How long the producer batches messages before sending (ms).
PRODUCER_LINGER_MS = 5
#: Heartbeats per session timeout (the heartbeat interval is the session timeout / this).
HEARTBEATS_PER_SESSION = 10
#: Shortest heartbeat interval we configure (ms).
MIN_HEARTBEAT_INTERVAL_MS = 500
#: How long one ``poll`` blocks (seconds); bounds the reaction time to a stop request.
POLL_TIMEOUT_SECONDS = 0.5
#: First delay before a failed message is retried (seconds); doubles with every failure.
RETRY_BACKOFF_INITIAL_SECONDS = 0.5
#: Longest delay between two retries of a failing message (seconds).
RETRY_BACKOFF_MAX_SECONDS = 10.0
#: Margin over the producer's message timeout when waiting for a dead-letter delivery (seconds).
DELIVERY_WAIT_MARGIN_SECONDS = 5.0
#: Header naming why a message was dead-lettered.
DEAD_LETTER_ERROR_HEADER = "error"
#: Label values of ``orders_export_consumer_messages_total{outcome}``.
CONSUMER_OUTCOMES = ("handled", "failed", "dead_lettered")


def producer_config(settings: Settings) -> dict[str, Any]:
    """An idempotent producer (acks=all, no duplicates or reordering from its own retries).

    ``message.timeout.ms`` is bounded so that a broker that is down surfaces as failed
    delivery reports within seconds instead of messages piling up in memory.
    """
    return {
        "bootstrap.servers": settings.require("kafka_bootstrap_servers"),
        "enable.idempotence": True,
        "acks": "all",
        "message.timeout.ms": PRODUCER_MESSAGE_TIMEOUT_MS,
        "linger.ms": PRODUCER_LINGER_MS,
        "logger": librdkafka_log,
    }


#: Longest a fetch waits for data before returning what it has (milliseconds).
FETCH_WAIT_MAX_MS = 20


def consumer_config(settings: Settings, *, group_id: str) -> dict[str, Any]:
    """A group consumer whose offsets are stored only after the handler succeeded."""
    session_timeout_ms = settings.kafka_session_timeout_ms
    return {
        "bootstrap.servers": settings.require("kafka_bootstrap_servers"),
        "group.id": group_id,
        "enable.auto.offset.store": False,
        "enable.auto.commit": True,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": session_timeout_ms,
        "heartbeat.interval.ms": max(
            MIN_HEARTBEAT_INTERVAL_MS, session_timeout_ms // HEARTBEATS_PER_SESSION
        ),
        # Redpanda is set up with its topics; the local mock cluster creates them on first use.
        "allow.auto.create.topics": True,
        # An export request should not sit in a fetch that waits for more data (default 500).
        "fetch.wait.max.ms": FETCH_WAIT_MAX_MS,
        "logger": librdkafka_log,
    }


def retry_delay(failures: int) -> float:
    """Exponential backoff after ``failures`` consecutive failures (seconds, capped)."""
    if failures <= 0:
        return 0.0
    exponent = min(failures - 1, 32)
    return float(min(RETRY_BACKOFF_MAX_SECONDS, RETRY_BACKOFF_INITIAL_SECONDS * 2**exponent))


class DeadLetterFailed(OrdersExportError):
    """A message could not be written to the dead-letter topic (it is retried)."""

    code = "dead_letter_failed"


class ConsumerLoop:
    """Consume ``topics`` in group ``group_id`` and hand every decoded event to ``handle``.

    - Success: the message's offset is stored (and auto-committed shortly after).
    - Undecodable message: copied untouched (key, value, headers + an ``error`` header) to the
      dead-letter topic; once that delivery is confirmed its offset is stored.
    - ``handle`` raises: nothing is stored; the consumer seeks back to the message, sleeps
      (exponential backoff, capped at 10 s, cut short by ``stop``) and retries it. Later
      messages of that partition wait behind it; other partitions go on between the sleeps.
    - ``handle`` still fails CONSUMER_MAX_RETRY_SECONDS after its first failure: the message is
      copied to the dead-letter topic (``error`` names the exception type), ``give_up`` is
      called with the event, and its offset is stored. No message holds up its partition for
      longer than that bound (plus one handler call).

    Only a bad configuration makes :meth:`run` raise (at start); after that, errors are
    logged and the loop carries on until ``stop`` is set.

    The counters ``handled``, ``failed`` and ``dead_lettered`` are also exported as
    ``orders_export_consumer_messages_total{group, outcome}``.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        group_id: str,
        topics: list[str],
        handle: Callable[[Event], None],
        name: str,
        give_up: Callable[[Event, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.group_id = group_id
        self.topics = list(topics)
        self.handle = handle
        self.give_up = give_up
        self.name = name
        self.max_retry_seconds = float(settings.consumer_max_retry_seconds)
        #: (topic, partition, offset) of the failing message -> when it first failed.
        self._failing_since: dict[tuple[str, int, int], float] = {}
        self.handled = 0
        self.failed = 0
        self.dead_lettered = 0
        self._consecutive_failures = 0
        #: (topic, partition) -> offset of a failed message that must be retried first.
        self._retry_from: dict[tuple[str, int], int] = {}
        self._dead_letter_producer: Any = None
        #: (topic, partition) this consumer holds (``orders_export_consumer_assigned_partitions``).
        self._held: set[tuple[str, int]] = set()
        metrics.declare(metrics.CONSUMED, *((group_id, o) for o in CONSUMER_OUTCOMES))
        metrics.CONSUMER_PARTITIONS.labels(group_id).set(0)

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set, then close (which commits the stored offsets)."""
        consumer = Consumer(consumer_config(self.settings, group_id=self.group_id))
        try:
            consumer.subscribe(
                self.topics,
                on_assign=self._assigned,
                on_revoke=self._forget_partitions,
                on_lost=self._forget_partitions,
            )
            log.info("%s: consuming %s as %s", self.name, ", ".join(self.topics), self.group_id)
            while not stop.is_set():
                try:
                    failed = self._poll_once(consumer)
                except Exception as exc:
                    # Anything unexpected (client errors, bugs): log, back off, keep going.
                    log.warning("%s: consumer loop error (%s)", self.name, type(exc).__name__)
                    self._consecutive_failures += 1
                    failed = True
                if failed:
                    delay = retry_delay(self._consecutive_failures)
                    log.info("%s: backing off %.1f s", self.name, delay)
                    stop.wait(delay)
        finally:
            self._close(consumer)

    def _poll_once(self, consumer: Any) -> bool:
        """Poll and process at most one message; True when processing it failed."""
        message = consumer.poll(POLL_TIMEOUT_SECONDS)
        if message is None:
            return False
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("%s: consumer error (skipped): %s", self.name, error.str())
            return False
        where = (message.topic(), message.partition())
        pending = self._retry_from.get(where)
        if pending is not None and message.offset() > pending:
            # A message fetched before the seek to the failed one took effect: skip it, it is
            # seen again after the failed message succeeded.
            consumer.seek(TopicPartition(where[0], where[1], pending))
            return False
        failure = self._process(consumer, message)
        if failure is None:
            self._retry_from.pop(where, None)
            self._failing_since.pop((*where, message.offset()), None)
            self._consecutive_failures = 0
            return False
        since = self._failing_since.setdefault((*where, message.offset()), time.monotonic())
        event, error = failure
        if (
            event is not None
            and time.monotonic() - since >= self.max_retry_seconds
            and self._give_up(consumer, message, event, error)
        ):
            self._retry_from.pop(where, None)
            self._failing_since.pop((*where, message.offset()), None)
            self._consecutive_failures = 0
            return False
        self._retry_from[where] = message.offset()
        self._consecutive_failures += 1
        self.failed += 1
        metrics.CONSUMED.labels(self.group_id, "failed").inc()
        try:
            consumer.seek(TopicPartition(where[0], where[1], message.offset()))
        except Exception as exc:
            # The partition was probably revoked; its next owner starts from the last committed
            # offset, which is not past this message. The guard above covers the case that we
            # still own it.
            log.warning("%s: seek back failed (%s)", self.name, type(exc).__name__)
        return True

    def _give_up(self, consumer: Any, message: Any, event: Event, error: str) -> bool:
        """Dead-letter a message that kept failing; True when its offset was stored."""
        reason = f"handler failed for {self.max_retry_seconds:.0f} s: {error}"
        try:
            self._dead_letter(message, reason=reason)
        except Exception as exc:
            log.warning("%s: dead-lettering a failing message failed (%s)", self.name, exc)
            return False
        if self.give_up is not None:
            try:
                self.give_up(event, error)
            except Exception as exc:  # recorded by the dead letter anyway
                log.warning("%s: give_up failed (%s)", self.name, type(exc).__name__)
        self._moved_on(consumer, message)
        log.error(
            "%s: %s of export %s still failing after %.0f s; moved to %s",
            self.name,
            type(event).__name__,
            event.export_id,
            self.max_retry_seconds,
            TOPIC_DEAD_LETTER,
        )
        return True

    def _process(self, consumer: Any, message: Any) -> tuple[Event | None, str] | None:
        """Handle one message; None when its offset was stored, else (the event if it
        decoded, the error's type name)."""
        try:
            event = decode(message.value())
        except UndecodableEvent as exc:
            try:
                self._dead_letter(message, reason=exc.message)
            except Exception as dl_exc:
                log.warning(
                    "%s: dead-lettering %s[%d]@%d failed (%s)",
                    self.name,
                    message.topic(),
                    message.partition(),
                    message.offset(),
                    type(dl_exc).__name__,
                )
                return None, type(dl_exc).__name__
            self._moved_on(consumer, message)
            log.warning(
                "%s: undecodable message %s[%d]@%d moved to %s",
                self.name,
                message.topic(),
                message.partition(),
                message.offset(),
                TOPIC_DEAD_LETTER,
            )
            return None
        try:
            self.handle(event)
        except Exception as exc:
            # Type and export id only: messages of arbitrary exceptions may carry secrets.
            log.warning(
                "%s: %s of export %s failed (%s); it will be retried",
                self.name,
                type(event).__name__,
                event.export_id,
                type(exc).__name__,
            )
            return event, type(exc).__name__
        consumer.store_offsets(message=message)
        self.handled += 1
        metrics.CONSUMED.labels(self.group_id, "handled").inc()
        return None

    def _moved_on(self, consumer: Any, message: Any) -> None:
        """``message`` is on the dead-letter topic: its offset is stored and it is counted."""
        consumer.store_offsets(message=message)
        self.dead_lettered += 1
        metrics.CONSUMED.labels(self.group_id, "dead_lettered").inc()

    def _dead_letter(self, message: Any, *, reason: str) -> None:
        """Copy ``message`` to the dead-letter topic and wait until the broker has it."""
        if self._dead_letter_producer is None:
            self._dead_letter_producer = Producer(producer_config(self.settings))
        producer = self._dead_letter_producer
        headers = list(message.headers() or [])
        headers += [
            (DEAD_LETTER_ERROR_HEADER, reason.encode()),
            ("source-topic", message.topic().encode()),
            ("source-partition", str(message.partition()).encode()),
            ("source-offset", str(message.offset()).encode()),
        ]
        outcome: list[Any] = []
        producer.produce(
            TOPIC_DEAD_LETTER,
            value=message.value(),
            key=message.key(),
            headers=headers,
            on_delivery=lambda err, _msg: outcome.append(err),
        )
        producer.flush(PRODUCER_MESSAGE_TIMEOUT_MS / 1000 + DELIVERY_WAIT_MARGIN_SECONDS)
        if not outcome:
            raise DeadLetterFailed("delivery not confirmed")
        if outcome[0] is not None:
            if outcome[0].fatal():
                self._dead_letter_producer = None
            raise DeadLetterFailed(str(outcome[0].name()))

    def _assigned(self, consumer: Any, partitions: list[Any]) -> None:
        self._held |= {(p.topic, p.partition) for p in partitions}
        metrics.CONSUMER_PARTITIONS.labels(self.group_id).set(len(self._held))
        log.info("%s: %d partitions assigned", self.name, len(self._held))

    def _forget_partitions(self, consumer: Any, partitions: list[Any]) -> None:
        for partition in partitions:
            self._retry_from.pop((partition.topic, partition.partition), None)
            self._held.discard((partition.topic, partition.partition))
        self._failing_since.clear()
        metrics.CONSUMER_PARTITIONS.labels(self.group_id).set(len(self._held))

    def _close(self, consumer: Any) -> None:
        try:
            consumer.close()
        except Exception as exc:
            log.warning("%s: closing the consumer failed (%s)", self.name, type(exc).__name__)
        self._held.clear()
        metrics.CONSUMER_PARTITIONS.labels(self.group_id).set(0)
        if self._dead_letter_producer is not None:
            self._dead_letter_producer.flush(DELIVERY_WAIT_MARGIN_SECONDS)
            self._dead_letter_producer = None
        log.info(
            "%s: stopped (handled %d, failed %d, dead-lettered %d)",
            self.name,
            self.handled,
            self.failed,
            self.dead_lettered,
        )
