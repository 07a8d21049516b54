"""The Dramatiq side of the worker: the broker and the ``exports.generate_csv`` actor."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq import Message
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from shared import lifecycle
from shared.db import transaction
from shared.lanes import FAST, NORMAL
from shared.runner import ExportRunner, RunOutcome
from shared.settings import DEFAULT_STATEMENT_TIMEOUT_SECONDS, Settings

log = logging.getLogger(__name__)

#: Queue of export work; served by its own worker pool so it never starves other work.
EXPORTS_QUEUE = "exports"
#: Queue of the fast lane (small exports, shared/lanes.py), served by threads of its own.
FAST_QUEUE = "exports.fast"
#: Queue of each lane.
LANE_QUEUES = {NORMAL: EXPORTS_QUEUE, FAST: FAST_QUEUE}
#: Name of the actor (namespaced: <area>.<verb>).
GENERATE_CSV = "exports.generate_csv"
#: The same work on the fast lane's queue.
GENERATE_CSV_FAST = "exports.generate_csv_fast"
#: Wait before trying an export again whose account already has one running (milliseconds).
BUSY_DELAY_MS = 2_000
#: Wait before looking again while workers are paused (milliseconds).
PAUSED_DELAY_MS = 5_000
#: Margin of the actor's time limit over the export's two statements (seconds).
TIME_LIMIT_MARGIN_SECONDS = 300
#: Tries at sending a job's next work message while Redis is away, and the first pause between
#: them (seconds, doubling: 0.5 + 1 + 2); after that, housekeeping sends it again.
RESEND_ATTEMPTS = 4
RESEND_PAUSE_SECONDS = 0.5


class WakingRedisBroker(RedisBroker):
    """Dramatiq's Redis broker, whose idle consumers wake as soon as this process enqueues.

    Dramatiq's own consumer polls Redis while idle, sleeping 50-100 % of its idle timeout
    between empty fetches, so a job the Kafka bridge enqueued waited ~20 ms on average (up to
    the whole timeout) before a worker thread saw it, on every export. Here every enqueue from
    this process sets an event per queue, and an idle consumer of that queue waits on the event
    instead of sleeping: the bridge's job is fetched at once, and an idle worker does not poll
    at all in between. What other processes enqueue is still fetched within the idle timeout.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._wake_lock = threading.Lock()
        self._wake: dict[str, threading.Event] = {}

    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        return _WakingConsumer

    def wake_event(self, queue_name: str) -> threading.Event:
        """The event set whenever this process enqueues on ``queue_name`` (one consumer per
        queue and process: the worker's two pools serve disjoint queues)."""
        event = self._wake.get(queue_name)
        if event is None:
            with self._wake_lock:
                event = self._wake.setdefault(queue_name, threading.Event())
        return event

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        enqueued: Message[Any] = super().enqueue(message, delay=delay)
        self.wake_event(enqueued.queue_name).set()  # the delay queue's, when delayed
        return enqueued


class _WakingConsumer(_RedisConsumer):
    """Fetches without Dramatiq's sleep (its timeout is 0), then waits on the queue's event."""

    def __init__(
        self, broker: WakingRedisBroker, queue_name: str, prefetch: int, timeout: int
    ) -> None:
        super().__init__(broker, queue_name, prefetch, 0)  # type: ignore[no-untyped-call]
        self._idle_seconds = timeout / 1000
        self._wake = broker.wake_event(queue_name)

    def __next__(self) -> MessageProxy | None:
        message: MessageProxy | None = super().__next__()  # type: ignore[no-untyped-call]
        if message is None:  # nothing fetched (or all it may hold is being worked on)
            # An enqueue between the empty fetch and here has set the event: no wait then.
            # Clearing before the next fetch loses nothing: that fetch sees what came before.
            self._wake.wait(self._idle_seconds)
            self._wake.clear()
        return message


def make_broker(settings: Settings) -> WakingRedisBroker:
    broker = WakingRedisBroker(url=settings.require("redis_url"))
    dramatiq.set_broker(broker)
    return broker


def add_prometheus_middleware(broker: RedisBroker, *, multiproc_dir: str) -> None:
    """Dramatiq's own metrics (``dramatiq_*``), served by the worker's METRICS_PORT.

    The middleware writes prometheus_client multiprocess files into the directory named by
    ``dramatiq_prom_db`` when its module is imported: we point it at the worker's own
    PROMETHEUS_MULTIPROC_DIR, so one endpoint serves both. Its own HTTP server is a "fork" that
    only the ``dramatiq`` command line starts; this worker runs ``Worker`` in-process, so there
    is no second server (and no port 9191) to take care of. Its metrics are created on the
    ``process_boot`` event, which the worker emits.
    """
    os.environ["dramatiq_prom_db"] = multiproc_dir  # noqa: SIM112 - dramatiq's spelling
    from dramatiq.middleware.prometheus import Prometheus

    broker.add_middleware(Prometheus())


def time_limit_ms(statement_timeout_seconds: int) -> int:
    """Dramatiq's time limit of one export run, derived from EXPORT_STATEMENT_TIMEOUT_SECONDS.

    One run is two statements (the estimate, then the COPY, each bounded by the statement
    timeout) plus the commit: twice the timeout and a margin, so the database's own timeout
    (a clean, user-fixable ``query_timeout``) always fires first. The limit stays a backstop.
    """
    return (2 * statement_timeout_seconds + TIME_LIMIT_MARGIN_SECONDS) * 1000


@dataclass(frozen=True)
class Actors:
    """The declared actors, for senders (Kafka bridge, maintenance) and the worker."""

    generate_csv: dramatiq.Actor[[str], None]
    #: The fast lane's actor (queue ``exports.fast``); None in tests that declare one lane.
    generate_csv_fast: dramatiq.Actor[[str], None] | None = None

    def send_generate(
        self, export_id: str, *, delay_ms: int | None = None, lane: str = NORMAL
    ) -> None:
        actor = self.generate_csv
        if lane == FAST and self.generate_csv_fast is not None:
            actor = self.generate_csv_fast
        actor.send_with_options(args=(export_id,), delay=delay_ms)

    def waiting_export_ids(self) -> set[str]:
        """Export ids with a work message in the exports queue: waiting in Redis, or fetched
        by a worker's consumer and not yet acknowledged (Dramatiq keeps each message in the
        queue's ``.msgs`` hash until then). Delayed messages are left out: a consumer that lost
        its Redis connection drops those from memory (docs/reliability.md, known limits)."""
        broker = self.generate_csv.broker
        client = broker.client  # type: ignore[attr-defined]
        namespace = broker.namespace  # type: ignore[attr-defined]
        found: set[str] = set()
        raws = [raw for q in LANE_QUEUES.values() for raw in client.hvals(f"{namespace}:{q}.msgs")]
        for raw in raws:
            try:
                args = json.loads(raw).get("args") or []
            except (ValueError, AttributeError):
                continue
            if args and isinstance(args[0], str):
                found.add(args[0])
        return found


def declare_actors(
    broker: RedisBroker,
    *,
    runner: ExportRunner | None,
    sessions: sessionmaker[Session],
    statement_timeout_seconds: int = DEFAULT_STATEMENT_TIMEOUT_SECONDS,
) -> Actors:
    """Declare the actors on ``broker``; ``runner`` may be None in processes that only send."""

    def generate(lane: str, export_id: str) -> None:
        if runner is None:
            raise RuntimeError("this process only sends messages")
        result = runner.run(uuid.UUID(export_id))
        delay_ms = {
            RunOutcome.RETRY: int(result.delay_seconds * 1000),
            RunOutcome.BUSY: BUSY_DELAY_MS,
            RunOutcome.PAUSED: PAUSED_DELAY_MS,
            RunOutcome.DRAINING: 0,  # this worker is stopping: another one takes it
        }.get(result.outcome)
        log.info("export %s: %s", export_id, result.outcome.value)
        if delay_ms is not None:
            # Still queued: come back later (Dramatiq holds the delayed message in Redis).
            with transaction(sessions) as session:
                lifecycle.mark_enqueued(session, [uuid.UUID(export_id)])
            _send_later(actors, export_id, delay_ms=delay_ms, lane=lane)

    def generate_csv(export_id: str) -> None:
        generate(NORMAL, export_id)

    def generate_csv_fast(export_id: str) -> None:
        generate(FAST, export_id)

    def declare(name: str, queue: str, fn: Callable[[str], None]) -> dramatiq.Actor[[str], None]:
        return dramatiq.actor(
            actor_name=name,
            queue_name=queue,
            broker=broker,
            max_retries=0,  # retries are decided by ExportRunner (classified errors, PG attempts)
            time_limit=time_limit_ms(statement_timeout_seconds),
        )(fn)

    actors = Actors(
        generate_csv=declare(GENERATE_CSV, EXPORTS_QUEUE, generate_csv),
        generate_csv_fast=declare(GENERATE_CSV_FAST, FAST_QUEUE, generate_csv_fast),
    )
    return actors


def _send_later(actors: Actors, export_id: str, *, delay_ms: int, lane: str = NORMAL) -> None:
    """Send the still-queued job's next work message, riding out a short Redis outage.

    Raising here would only dead-letter the message being processed; the job would still wait
    for housekeeping. So: a few tries, then leave it to housekeeping, which sends work again for
    jobs queued longer than EXPORT_REQUEUE_AFTER_SECONDS (counted from ``mark_enqueued``).
    """
    for attempt in range(1, RESEND_ATTEMPTS + 1):
        try:
            actors.send_generate(export_id, delay_ms=delay_ms, lane=lane)
            return
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if attempt == RESEND_ATTEMPTS:
                log.warning(
                    "export %s: next work message not sent (%s); housekeeping will send it",
                    export_id,
                    type(exc).__name__,
                )
                return
            time.sleep(RESEND_PAUSE_SECONDS * 2 ** (attempt - 1))
