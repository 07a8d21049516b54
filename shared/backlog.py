"""The waiting work, read from PostgreSQL, Redis and Kafka for the backlog gauges.

These gauges describe the whole system, not one process, so one kind of process owns them: the
worker. Its :class:`BacklogMonitor` thread refreshes a snapshot every few seconds with a
handful of cheap queries, and :class:`~shared.metrics.BacklogCollector` serves the latest one
at scrape time, so a scrape never touches the database. Worker replicas all report the same
values: dashboards and alerts aggregate them with ``max``, never ``sum``.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, TopicPartition
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from shared import outbox
from shared.db import transaction
from shared.kafka import librdkafka_log
from shared.metrics import Backlog, JobsSnapshot
from shared.models import ExportJob, ExportState, ExportTransition
from shared.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Pause between two readings (seconds).
REFRESH_SECONDS = 5.0
#: Counts of finished states (a full index scan of a growing table) are read this often (s).
SETTLED_REFRESH_SECONDS = 60.0
#: A reading older than this is not served any more (seconds): a stuck source shows as a gap.
STALE_AFTER_SECONDS = 30.0
#: Longest a backlog query may run (milliseconds).
STATEMENT_TIMEOUT_MS = 2000
#: Timeout of each Kafka request of a lag reading (seconds).
KAFKA_TIMEOUT_SECONDS = 5.0
#: States whose counts change often (read every time).
ACTIVE_STATES = (ExportState.QUEUED, ExportState.RUNNING)


def _age_seconds(moment: dt.datetime | None, now: dt.datetime) -> float:
    return max(0.0, (now - moment).total_seconds()) if moment is not None else 0.0


def read_jobs(
    session: Session, *, stalled_after_seconds: int, settled: Mapping[str, int] | None = None
) -> JobsSnapshot:
    """Jobs per state, the oldest queued job, stalled jobs and the outbox backlog.

    ``settled`` are counts of the finished states read earlier; without them every state is
    counted now.
    """
    session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
    now: dt.datetime = session.scalar(select(func.now()))  # type: ignore[assignment]
    counted = ACTIVE_STATES if settled is not None else tuple(ExportState)
    per_state = {state.value: 0 for state in ExportState}
    per_state.update(settled or {})
    rows = session.execute(
        select(ExportJob.state, func.count())
        .where(ExportJob.state.in_(counted))
        .group_by(ExportJob.state)
    )
    for state, count in rows:
        per_state[state.value] = count
    # A queued job's age counts from when it last entered the queue (a retried job starts over).
    entered = (
        select(func.max(ExportTransition.at))
        .where(
            ExportTransition.export_id == ExportJob.id,
            ExportTransition.to_state == ExportState.QUEUED,
        )
        .scalar_subquery()
    )
    oldest_queued = session.scalar(
        select(func.min(func.coalesce(entered, ExportJob.created_at))).where(
            ExportJob.state == ExportState.QUEUED
        )
    )
    stalled = session.scalar(
        select(func.count()).where(
            ExportJob.state == ExportState.RUNNING,
            func.coalesce(ExportJob.heartbeat_at, ExportJob.started_at)
            < func.now() - dt.timedelta(seconds=stalled_after_seconds),
        )
    )
    return JobsSnapshot(
        per_state=per_state,
        oldest_queued_seconds=_age_seconds(oldest_queued, now),
        stalled=int(stalled or 0),
        outbox_pending=outbox.pending_count(session),
        outbox_oldest_pending_seconds=_age_seconds(outbox.oldest_pending_at(session), now),
    )


def read_settled_counts(session: Session) -> dict[str, int]:
    """Counts of the states that are not queued or running."""
    session.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
    rows = session.execute(
        select(ExportJob.state, func.count())
        .where(ExportJob.state.not_in(ACTIVE_STATES))
        .group_by(ExportJob.state)
    )
    counts = {state.value: 0 for state in ExportState if state not in ACTIVE_STATES}
    counts.update({state.value: count for state, count in rows})
    return counts


def read_queue_depth(client: Any, *, namespace: str, queues: Sequence[str]) -> dict[str, int]:
    """Messages not yet acknowledged per Dramatiq queue (the Redis broker keeps every message
    of ``<queue>`` in the hash ``<namespace>:<queue>.msgs`` until it is acked)."""
    pipeline = client.pipeline(transaction=False)
    for queue in queues:
        pipeline.hlen(f"{namespace}:{queue}.msgs")
    return {queue: int(count) for queue, count in zip(queues, pipeline.execute(), strict=True)}


class ConsumerLag:
    """Lag of consumer groups: high watermark minus committed offset, per topic.

    Uses one consumer per group that never subscribes (so it never joins the group or moves
    its offsets); it only asks for committed offsets and watermarks.
    """

    def __init__(self, settings: Settings, groups: Mapping[str, Sequence[str]]) -> None:
        self._settings = settings
        self._groups = {group: tuple(topics) for group, topics in groups.items()}
        self._consumers: dict[str, Any] = {}

    def _consumer(self, group: str) -> Any:
        if group not in self._consumers:
            self._consumers[group] = Consumer(
                {
                    "bootstrap.servers": self._settings.require("kafka_bootstrap_servers"),
                    "group.id": group,
                    "enable.auto.commit": False,
                    "logger": librdkafka_log,
                }
            )
        return self._consumers[group]

    def read(self) -> dict[tuple[str, str], int]:
        lag: dict[tuple[str, str], int] = {}
        for group, topics in self._groups.items():
            consumer = self._consumer(group)
            consumer.poll(0)  # serve queued client events (errors, logs)
            for topic in topics:
                lag[(group, topic)] = self._topic_lag(consumer, topic)
        return lag

    def _topic_lag(self, consumer: Any, topic: str) -> int:
        metadata = consumer.list_topics(topic, timeout=KAFKA_TIMEOUT_SECONDS).topics.get(topic)
        if metadata is None or metadata.error is not None:
            if metadata is not None and metadata.error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise RuntimeError(f"metadata of {topic}: {metadata.error.name()}")
            return 0  # not created yet: nothing to consume
        partitions = [TopicPartition(topic, partition) for partition in metadata.partitions]
        total = 0
        for committed in consumer.committed(partitions, timeout=KAFKA_TIMEOUT_SECONDS):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, committed.partition), timeout=KAFKA_TIMEOUT_SECONDS
            )
            start = committed.offset if committed.offset >= 0 else low  # none: from the start
            total += max(0, high - start)
        return total

    def close(self) -> None:
        for consumer in self._consumers.values():
            consumer.close()
        self._consumers.clear()


class BacklogMonitor:
    """Keeps a fresh :class:`~shared.metrics.Backlog` for the collector (one thread)."""

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        redis_client: Any,
        namespace: str,
        queues: Sequence[str],
        consumer_groups: Mapping[str, Sequence[str]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._redis = redis_client
        self._namespace = namespace
        self._queues = tuple(queues)
        self._lag = ConsumerLag(settings, consumer_groups)
        self._clock = clock
        self._latest = Backlog()
        self._taken_at = float("-inf")
        self._settled: dict[str, int] | None = None
        self._settled_at = float("-inf")
        self._failing: set[str] = set()

    def snapshot(self) -> Backlog:
        """The latest reading, or an empty one when it is older than STALE_AFTER_SECONDS."""
        if self._clock() - self._taken_at > STALE_AFTER_SECONDS:
            return Backlog()
        return self._latest

    def refresh(self) -> Backlog:
        """Read every source now; a failing source leaves its part out."""
        backlog = Backlog(
            jobs=self._attempt("database", self._read_jobs),
            queue_depth=self._attempt("redis", self._read_queues),
            consumer_lag=self._attempt("kafka", self._lag.read),
        )
        self._latest, self._taken_at = backlog, self._clock()
        return backlog

    def run(self, stop: threading.Event) -> None:
        """Refresh every REFRESH_SECONDS until ``stop`` is set."""
        try:
            while not stop.is_set():
                self.refresh()
                stop.wait(REFRESH_SECONDS)
        finally:
            self._lag.close()

    def _read_jobs(self) -> JobsSnapshot:
        now = self._clock()
        with transaction(self._sessions) as session:
            if self._settled is None or now - self._settled_at > SETTLED_REFRESH_SECONDS:
                self._settled = read_settled_counts(session)
                self._settled_at = now
            return read_jobs(
                session,
                stalled_after_seconds=self._settings.export_lease_seconds,
                settled=self._settled,
            )

    def _read_queues(self) -> dict[str, int]:
        return read_queue_depth(self._redis, namespace=self._namespace, queues=self._queues)

    def _attempt(self, source: str, read: Callable[[], T]) -> T | None:
        try:
            value = read()
        except Exception as exc:  # any source may be away for a while; say so once
            if source not in self._failing:
                log.warning(
                    "backlog: cannot read %s (%s); its gauges are left out",
                    source,
                    type(exc).__name__,
                )
                self._failing.add(source)
            return None
        if source in self._failing:
            log.info("backlog: %s readable again", source)
            self._failing.discard(source)
        return value
