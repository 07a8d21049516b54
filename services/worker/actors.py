"""The Dramatiq side of the worker: the broker and the ``exports.generate_csv`` actor."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy.orm import Session, sessionmaker

from shared import jobs
from shared.db import transaction
from shared.runner import ExportRunner, Outcome
from shared.settings import Settings

log = logging.getLogger(__name__)

#: Queue of export work; served by its own worker pool so it never starves other work.
EXPORTS_QUEUE = "exports"
#: Name of the actor (namespaced: <area>.<verb>).
GENERATE_CSV = "exports.generate_csv"
#: Wait before trying an export again whose account already has one running (milliseconds).
BUSY_DELAY_MS = 2_000
#: Wait before looking again while workers are paused (milliseconds).
PAUSED_DELAY_MS = 5_000
#: Longest one export may run before Dramatiq interrupts it (milliseconds, 4 hours).
TIME_LIMIT_MS = 4 * 3600 * 1000


def make_broker(settings: Settings) -> RedisBroker:
    broker = RedisBroker(url=settings.require("redis_url"))  # type: ignore[no-untyped-call]
    dramatiq.set_broker(broker)
    return broker


@dataclass(frozen=True)
class Actors:
    """The declared actors, for senders (Kafka bridge, maintenance) and the worker."""

    generate_csv: dramatiq.Actor[[str], None]

    def send_generate(self, export_id: str, *, delay_ms: int | None = None) -> None:
        self.generate_csv.send_with_options(args=(export_id,), delay=delay_ms)


def declare_actors(
    broker: RedisBroker, *, runner: ExportRunner | None, sessions: sessionmaker[Session]
) -> Actors:
    """Declare the actors on ``broker``; ``runner`` may be None in processes that only send."""

    def generate_csv(export_id: str) -> None:
        if runner is None:
            raise RuntimeError("this process only sends messages")
        result = runner.run(uuid.UUID(export_id))
        delay_ms = {
            Outcome.RETRY: int(result.delay_seconds * 1000),
            Outcome.BUSY: BUSY_DELAY_MS,
            Outcome.PAUSED: PAUSED_DELAY_MS,
        }.get(result.outcome)
        log.info("export %s: %s", export_id, result.outcome.value)
        if delay_ms is not None:
            # Still queued: come back later (Dramatiq holds the delayed message in Redis).
            with transaction(sessions) as session:
                jobs.mark_enqueued(session, [uuid.UUID(export_id)])
            actors.send_generate(export_id, delay_ms=delay_ms)

    actor = dramatiq.actor(
        actor_name=GENERATE_CSV,
        queue_name=EXPORTS_QUEUE,
        broker=broker,
        max_retries=0,  # retries are decided by ExportRunner (classified errors, attempts in PG)
        time_limit=TIME_LIMIT_MS,
    )(generate_csv)
    actors = Actors(generate_csv=actor)
    return actors
