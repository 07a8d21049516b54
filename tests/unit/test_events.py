"""Domain events: the JSON wire format, the topics, and what a consumer cannot decode."""

from __future__ import annotations

import json

import pytest

from shared.errors import UndecodableEvent
from shared.events import (
    EVENT_TYPES,
    EVENT_VERSION,
    TOPIC_LIFECYCLE,
    TOPIC_REQUESTED,
    ExportExpired,
    ExportFailed,
    ExportReady,
    ExportRequested,
    ExportStarted,
    decode,
)


def test_every_event_round_trips_through_its_wire_format() -> None:
    events = [
        ExportRequested(export_id="e", account="acme"),
        ExportStarted(export_id="e", account="acme", attempt=2),
        ExportReady(export_id="e", account="acme", requested_by=1, row_count=3, size_bytes=4,
                    expires_at="2026-01-01T00:00:00+00:00", notify=False),
        ExportFailed(export_id="e", account="acme", requested_by=1, code="c", message="m",
                     retryable=True, final=False),
        ExportExpired(export_id="e", account="acme", reason="deleted", deleted_by=5),
    ]  # fmt: skip
    assert {type(e) for e in events} | {EVENT_TYPES["ExportCanceled"]} == set(EVENT_TYPES.values())
    for event in events:
        body = json.loads(event.encode())
        assert body["type"] == type(event).__name__ and body["version"] == EVENT_VERSION
        assert event.key == "e" and decode(event.encode()) == event


def test_requests_and_lifecycle_go_to_their_topics() -> None:
    assert ExportRequested(export_id="e", account="a").topic == TOPIC_REQUESTED
    assert ExportStarted(export_id="e", account="a", attempt=1).topic == TOPIC_LIFECYCLE


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    body = json.loads(ExportStarted(export_id="e", account="a", attempt=1).encode())
    body["added_later"] = True
    assert decode(json.dumps(body).encode()) == ExportStarted(
        export_id="e", account="a", attempt=1, event_id=body["event_id"],
        occurred_at=body["occurred_at"],
    )  # fmt: skip


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"",
        b"not json",
        b"[]",
        b'{"type": "ExportProgressed", "version": 1, "export_id": "e", "account": "a"}',
        b'{"type": "ExportStarted", "version": 2, "export_id": "e", "account": "a", "attempt": 1}',
        b'{"type": "ExportStarted", "version": 1, "export_id": "e", "account": "a"}',
        b"\xff\xfe",
    ],
)
def test_anything_malformed_is_undecodable(raw: bytes | None) -> None:
    with pytest.raises(UndecodableEvent):
        decode(raw)
