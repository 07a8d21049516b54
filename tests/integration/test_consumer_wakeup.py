"""An idle Dramatiq consumer of the worker waits for this process's own enqueues instead of
polling Redis, and an enqueue from this process ends its wait at once (real Redis)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker

from services.worker.actors import make_broker
from shared.settings import Settings

#: Far longer than the test may take: a consumer that returns a message was woken.
IDLE_MS = 600_000


@pytest.fixture
def broker(settings: Settings, redis_url: str) -> Iterator[Any]:
    broker = make_broker(settings.model_copy(update={"redis_url": redis_url}))
    try:
        yield broker
    finally:
        broker.close()


def message_on(queue: str) -> Message[Any]:
    return Message(queue_name=queue, actor_name="probe", args=(), kwargs={}, options={})


def test_an_idle_consumer_waits_without_polling_and_wakes_on_a_local_enqueue(broker: Any) -> None:
    queue = f"wakeup-{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    consumer = broker.consume(queue, prefetch=1, timeout=IDLE_MS)
    fetches = 0
    fetch = broker.do_fetch

    def counted_fetch(*args: Any) -> Any:
        nonlocal fetches
        fetches += 1
        return fetch(*args)

    broker.do_fetch = counted_fetch
    taken: list[Any] = []

    def take() -> None:
        while not taken:
            message = next(consumer)
            if message is not None:
                taken.append(message)

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    time.sleep(1.0)
    # Dramatiq's own consumer polls with a growing backoff: about ten fetches in this second.
    assert fetches <= 2, f"an idle consumer fetched {fetches} times in a second"

    sent = broker.enqueue(message_on(queue))
    thread.join(timeout=30)  # the idle wait is ten minutes: only the enqueue can end it
    assert taken, "the consumer was not woken by the enqueue"
    assert taken[0].message_id == sent.message_id
    consumer.ack(taken[0])
    consumer.close()


def test_a_consumer_still_sees_messages_enqueued_elsewhere(broker: Any, redis_url: str) -> None:
    """Another process's enqueue does not wake this one: it is fetched at the next idle poll."""
    queue = f"elsewhere-{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    consumer = broker.consume(queue, prefetch=1, timeout=50)
    other = RedisBroker(url=redis_url)  # type: ignore[no-untyped-call]  # another process's
    try:
        other.declare_queue(queue)
        sent = other.enqueue(message_on(queue))
        deadline = time.monotonic() + 30
        message = None
        while message is None and time.monotonic() < deadline:
            message = next(consumer)
        assert message is not None and message.message_id == sent.message_id
        consumer.ack(message)
    finally:
        consumer.close()
        other.close()
