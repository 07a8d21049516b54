"""The export pipeline end to end over real sockets: HTTP -> outbox -> Kafka -> Dramatiq ->
COPY -> S3 -> email -> signed download, including a crashed worker and a storage outage.
(The broker outage and the other infrastructure faults are in tests/faults.)"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx2
import pytest

from tests.support.exports import export_of, request_export, wait_state
from tests.support.reports import guarded, report_rows
from tests.support.stack import S3_KEYS, LiveStack, body_text, link_in, running
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

#: Demo orders in the account; exports below select 5,000 to 50,000 of them.
ORDERS = 55_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    root = Path(tmp_path_factory.mktemp("live"))
    # ~2 MB/s keeps a 50k-row export running for a few seconds, long enough to watch it.
    live = LiveStack(root, orders=ORDERS, env={"EXPORT_MAX_BYTES_PER_SECOND": "2000000"})
    yield from running(live)


def request_quickly(api: httpx2.Client, filters: dict[str, Any]) -> dict[str, Any]:
    """A background export: the request never waits for the export."""
    started = time.monotonic()
    export = request_export(api, filters)
    assert time.monotonic() - started < 2.0
    return export


def objects_under(stack: LiveStack, export_id: str) -> list[str]:
    client = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{stack.s3_port}", aws_access_key_id=S3_KEYS[0],
        aws_secret_access_key=S3_KEYS[1], region_name="us-east-1",
    )  # fmt: skip
    listing = client.list_objects_v2(Bucket="exports")
    return [o["Key"] for o in listing.get("Contents", []) if f"/exports/{export_id}/" in o["Key"]]


def test_admin_export_runs_in_background_emails_and_downloads(
    stack: LiveStack, api: httpx2.Client
) -> None:
    filters = {"channel": ["web", "pos", "marketplace"], "sort": "number"}
    # Given an admin asks for ~50,000 filtered orders
    export = request_quickly(api, filters)
    assert export["state"] == "queued" and export["filters"]["channel"] == [
        "web",
        "pos",
        "marketplace",
    ]
    # When the workers pick it up, progress rises while it runs
    samples = []
    while (current := export_of(api, export["id"]))["state"] in ("queued", "running"):
        if current["state"] == "running":
            samples.append(current["progress"]["rows_written"])
        time.sleep(0.2)
    assert current["state"] == "ready", current
    assert samples == sorted(samples), samples  # never goes backwards
    assert len({n for n in samples if n > 0}) >= 2, samples  # and visibly moves
    assert current["row_count"] > 45_000 and current["progress"]["percent"] == 100.0
    # Then exactly one email arrives with a signed link
    mails = wait_for(lambda: stack.emails_about(export["id"]), timeout=30, what="the ready email")
    time.sleep(1)
    assert len(stack.emails_about(export["id"])) == 1
    mail = mails[0]
    assert mail["To"].addresses[0].addr_spec == "admin@acme.test"
    assert "ready" in mail["Subject"].lower()
    assert f"{current['row_count']:,}" in body_text(mail)
    link = link_in(mail)
    assert link.startswith(stack.api_url + "/exports/")
    # And the link downloads exactly the report's rows, in order, value for value
    file = api.get(link)
    assert file.status_code == 200 and file.headers["content-type"] == "text/csv; charset=utf-8"
    rows = list(csv.reader(io.StringIO(file.text, newline="")))
    expected = report_rows(api, filters)
    assert rows[0] == expected[0]
    assert rows[1:] == [guarded(r) for r in expected[1:]]
    assert len(objects_under(stack, export["id"])) == 1


def test_worker_killed_mid_export_is_rescued_and_completes_once(
    stack: LiveStack, api: httpx2.Client
) -> None:
    export = request_quickly(api, {"status": ["paid", "fulfilled"]})

    def started() -> dict[str, Any] | None:
        current = export_of(api, export["id"])
        busy = current["state"] == "running" and current["progress"]["rows_written"] > 0
        return current if busy else None

    running = wait_for(started, timeout=30, what="the export to be running")
    assert running["download_url"] is None
    # When the worker process dies without any chance to clean up
    stack.kill_service("worker")
    assert export_of(api, export["id"])["download_url"] is None  # nothing partial is downloadable
    assert objects_under(stack, export["id"]) == []
    stack.start_service("worker")
    # Then the lease expires, the job is rescued and a new worker completes it, once
    done = wait_state(api, export["id"], "ready")
    assert done["attempts"] == 2
    history = stack.sql(
        "SELECT from_state::text, to_state::text, actor FROM export_transitions"
        " WHERE export_id = %s ORDER BY id",
        export["id"],
    )
    assert ("running", "queued", "system:rescuer") in history
    assert [h[1] for h in history].count("ready") == 1
    assert len(objects_under(stack, export["id"])) == 1
    wait_for(lambda: stack.emails_about(export["id"]), timeout=30, what="the ready email")
    time.sleep(1)
    assert len(stack.emails_about(export["id"])) == 1
    ready_events = stack.sql(
        "SELECT count(*) FROM outbox WHERE key = %s AND payload->>'type' = 'ExportReady'",
        export["id"],
    )
    assert ready_events == [(1,)]


def test_storage_outage_fails_visibly_emails_once_and_retry_succeeds(
    stack: LiveStack, api: httpx2.Client
) -> None:
    stack.stop_s3()
    try:
        export = request_quickly(api, {"status": ["paid"], "sort": "-total"})
        failed = wait_state(api, export["id"], "failed", timeout=90)
    finally:
        stack.start_s3()
    assert failed["attempts"] == 2
    assert failed["error"] == {
        "code": "storage_unavailable",
        "message": (
            "The file could not be stored on any attempt. Retry the export in a few minutes."
        ),
        "retryable": True,
    }
    mails = wait_for(lambda: stack.emails_about(export["id"]), timeout=30, what="the failure email")
    assert "failed" in mails[0]["Subject"].lower()
    assert f"{stack.api_url}/exports/{export['id']}" in body_text(mails[0])
    assert "127.0.0.1:" + str(stack.s3_port) not in body_text(mails[0])  # nothing internal leaks
    # When the user retries after the outage
    retried = api.post(f"/api/v1/order-exports/{export['id']}/retry")
    assert retried.status_code == 202
    wait_state(api, export["id"], "ready")
    wait_for(lambda: len(stack.emails_about(export["id"])) == 2, timeout=30, what="the ready email")
    subjects = sorted(m["Subject"].lower() for m in stack.emails_about(export["id"]))
    assert any("failed" in s for s in subjects) and any("ready" in s for s in subjects)
