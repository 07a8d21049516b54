"""Kafka delivers at least once: duplicated and replayed events on both topics must not cause a
second claim, a second file or a second email, and an undecodable message must go to the
dead-letter topic without stopping its consumer.

(Runs last in this package: the replay covers every event of the earlier fault tests since the
broker restart in test_infrastructure.)"""

from __future__ import annotations

import threading
from typing import Any

import httpx2
import pytest

from shared.events import TOPIC_DEAD_LETTER, TOPIC_LIFECYCLE, TOPIC_REQUESTED
from tests.faults.support import (
    BUCKET,
    GROUPS,
    assert_ready_once,
    high_watermarks,
    metric,
    metrics,
    partitions,
    produce,
    read_topic,
    rewind_group,
    s3_client,
    settle,
)
from tests.support.exports import request_export, wait_state
from tests.support.stack import LiveStack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

#: Undecodable values: not JSON at all, and JSON of an unknown event type.
POISON = (b"\xff\xfe not json", b'{"type": "ExportExploded", "version": 1}')


def _copies_of(stack: LiveStack, topic: str, export_id: str, event_type: str) -> list[Any]:
    """The original message(s) of ``event_type`` for the export, as the broker holds them."""
    return [
        m
        for m in read_topic(stack, topic)
        if m.key() == export_id.encode() and f'"type":"{event_type}"'.encode() in m.value()
    ]


def _published(stack: LiveStack, export_id: str, event_type: str) -> bool:
    rows = stack.sql(
        "SELECT published_at IS NOT NULL FROM outbox WHERE key = %s AND payload->>'type' = %s",
        export_id,
        event_type,
    )
    return rows == [(True,)]


def _send_again(stack: LiveStack, topic: str, message: Any, times: int) -> None:
    for _ in range(times):
        produce(
            stack,
            topic,
            message.value(),
            key=message.key(),
            partition=message.partition(),
            headers=message.headers(),
        )


def test_duplicate_events_do_no_duplicate_work_and_poison_is_dead_lettered(
    stack: LiveStack, api: httpx2.Client
) -> None:
    worker_before, notifier_before = metrics(stack, "worker"), metrics(stack, "notifier")
    dead_before = high_watermarks(stack, TOPIC_DEAD_LETTER)
    # Given an undecodable message at the head of every partition of both topics
    poisoned = {topic: partitions(stack, topic) for topic in (TOPIC_REQUESTED, TOPIC_LIFECYCLE)}
    for topic, numbers in poisoned.items():
        for number in numbers:
            produce(stack, topic, POISON[number % 2], key=b"poison", partition=number)
    # When an export is requested and its ExportRequested arrives three times
    export_id = request_export(api, {"channel": ["web"], "status": ["paid", "fulfilled"]})["id"]
    wait_for(
        lambda: _published(stack, export_id, "ExportRequested"), timeout=30, what="the request"
    )
    (requested,) = _copies_of(stack, TOPIC_REQUESTED, export_id, "ExportRequested")
    _send_again(stack, TOPIC_REQUESTED, requested, times=2)
    wait_state(api, export_id, "ready")
    # and its ExportReady arrives three times as well
    wait_for(lambda: _published(stack, export_id, "ExportReady"), timeout=30, what="ExportReady")
    (ready_event,) = _copies_of(stack, TOPIC_LIFECYCLE, export_id, "ExportReady")
    _send_again(stack, TOPIC_LIFECYCLE, ready_event, times=2)
    settle(stack)
    # Then: one claim, one file, one email
    assert_ready_once(stack, api, export_id, attempts=1)
    # And each poison message went to the dead-letter topic, untouched, saying where from
    dead = read_topic(stack, TOPIC_DEAD_LETTER, since=dead_before)
    sources = sorted(
        (dict(m.headers())["source-topic"].decode(), int(dict(m.headers())["source-partition"]))
        for m in dead
    )
    assert sources == sorted((t, n) for t, ns in poisoned.items() for n in ns)
    assert {m.value() for m in dead} == set(POISON)
    assert all(dict(m.headers())["error"].startswith(b"undecodable event") for m in dead)
    worker_after, notifier_after = metrics(stack, "worker"), metrics(stack, "notifier")

    def delta(after: Any, before: Any, name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    consumed = "orders_export_consumer_messages_total"
    assert delta(worker_after, worker_before, consumed, outcome="dead_lettered") == len(
        poisoned[TOPIC_REQUESTED]
    )
    assert delta(notifier_after, notifier_before, consumed, outcome="dead_lettered") == len(
        poisoned[TOPIC_LIFECYCLE]
    )
    assert delta(worker_after, worker_before, consumed, outcome="handled") >= 3
    runs = "orders_export_job_duration_seconds_count"
    assert delta(worker_after, worker_before, runs) == 1  # the copies never got a claim
    sent = "orders_export_notifications_total"
    assert delta(notifier_after, notifier_before, sent, kind="ready", outcome="sent") == 1
    assert delta(notifier_after, notifier_before, sent, kind="ready", outcome="duplicate") == 2


def _snapshot(stack: LiveStack) -> dict[str, Any]:
    """Everything a replay must leave alone."""
    listing = s3_client(stack).list_objects_v2(Bucket=BUCKET)
    return {
        "transitions": stack.sql("SELECT count(*), max(id) FROM export_transitions"),
        "jobs": stack.sql(
            "SELECT id, state::text, attempts, storage_key FROM export_jobs ORDER BY id"
        ),
        "outbox": stack.sql("SELECT count(*) FROM outbox"),
        "notifications": stack.sql(
            "SELECT export_id, kind, attempts, sent_at FROM notifications ORDER BY 1, 2"
        ),
        "objects": sorted(o["Key"] for o in listing.get("Contents", [])),
        "emails": len(stack.mail.messages()),
    }


def test_replaying_both_topics_from_the_beginning_changes_nothing(stack: LiveStack) -> None:
    settle(stack)
    before = _snapshot(stack)
    assert before["emails"] >= 1
    totals = {topic: sum(high_watermarks(stack, topic).values()) for topic in GROUPS.values()}
    # Given the consumers are stopped and their groups rewound to the beginning (what
    # `kafka-consumer-groups --reset-offsets --to-earliest` does after an incident)
    stoppers = [
        threading.Thread(target=stack.services[name].stop) for name in ("worker", "notifier")
    ]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()
    rewinders = [
        threading.Thread(target=rewind_group, args=(stack, group, topic))
        for group, topic in GROUPS.items()
    ]
    for thread in rewinders:
        thread.start()
    for thread in rewinders:
        thread.join()
    # When they start again, every event of both topics is delivered a second time
    stack.start_service("worker")
    stack.start_service("notifier")
    settle(stack, timeout=90)
    # Then nothing happened: no claim, no state change, no file, no email
    assert _snapshot(stack) == before
    worker, notifier = metrics(stack, "worker"), metrics(stack, "notifier")
    consumed = "orders_export_consumer_messages_total"
    assert (
        metric(worker, consumed, outcome="handled")
        + metric(worker, consumed, outcome="dead_lettered")
        == totals[TOPIC_REQUESTED]
    )
    assert (
        metric(notifier, consumed, outcome="handled")
        + metric(notifier, consumed, outcome="dead_lettered")
        == totals[TOPIC_LIFECYCLE]
    )
    assert metric(worker, "orders_export_job_duration_seconds_count") == 0
    sent = "orders_export_notifications_total"
    assert metric(notifier, sent, outcome="sent") == 0
    assert metric(notifier, sent, outcome="failed") == 0
    assert metric(notifier, sent, outcome="duplicate") >= before["emails"]
