"""Reading what the services wrote to Kafka, as the tests check it."""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import Consumer

from shared.events import TOPIC_DEAD_LETTER

#: Consumer session timeout of the tests' consumers (milliseconds).
SESSION_TIMEOUT_MS = 6000


def dead_letter(broker: str, *, timeout: float, value: bytes | None = None) -> Any:
    """The first message on the dead-letter topic (the first with ``value`` when given), read
    from the start by a consumer group of its own; fails after ``timeout`` seconds."""
    consumer = Consumer(
        {
            "bootstrap.servers": broker,
            "group.id": f"dead-letters-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": 500,
        }
    )
    try:
        consumer.subscribe([TOPIC_DEAD_LETTER])
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, "not on the dead-letter topic"
            message = consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            if value is None or message.value() == value:
                return message
    finally:
        consumer.close()
