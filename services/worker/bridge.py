"""Kafka -> Dramatiq: every ExportRequested becomes an ``exports.generate_csv`` message (on the
queue of the lane the request chose: shared/lanes.py).

The offset is stored only after the message is in Redis (ConsumerLoop does that when the
handler returns), so a crash in between re-delivers the request; the claim in PostgreSQL makes
the duplicate harmless.
"""

from __future__ import annotations

from services.worker.actors import Actors
from shared.events import TOPIC_REQUESTED, Event, ExportRequested
from shared.kafka import ConsumerLoop
from shared.settings import Settings

#: Consumer group of the workers on exports.requested.
GROUP_ID = "orders-export-worker"


def make_bridge(settings: Settings, actors: Actors) -> ConsumerLoop:
    def handle(event: Event) -> None:
        if isinstance(event, ExportRequested):
            actors.send_generate(event.export_id, lane=event.lane)

    return ConsumerLoop(
        settings=settings,
        group_id=GROUP_ID,
        topics=[TOPIC_REQUESTED],
        handle=handle,
        name="worker-bridge",
    )
