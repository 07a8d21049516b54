"""Infrastructure faults under a running pipeline: the Kafka-protocol broker, PostgreSQL, S3,
Redis and SMTP each fail at the worst moment. Every test ends with exactly one ready file with
the right rows, exactly one email, and attempts and history that tell what happened."""

from __future__ import annotations

import shutil
import signal
from typing import Any

import httpx2
import pytest

from tests.faults.support import (
    S3FaultProxy,
    abort_incomplete_upload_days,
    assert_ready_once,
    dramatiq_backlog,
    events,
    metric,
    metrics,
    restart_services,
    settle,
)
from tests.support.exports import export_of, request_export, wait_running, wait_state
from tests.support.stack import LiveStack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

STORAGE_FAILED = {
    "code": "storage_unavailable",
    "message": "The file could not be stored. The export will be retried.",
    "retryable": True,
}


def test_broker_down_at_request_time_the_export_completes_when_it_is_back(
    stack: LiveStack, api: httpx2.Client
) -> None:
    # (Runs first in this package: a new in-memory broker starts with empty topics.)
    stack.stop_broker()
    # Given the Kafka-protocol broker is unreachable, the request still succeeds at once
    export_id = request_export(api, {"channel": ["web"], "q": "example"})["id"]
    # and the relay keeps the event, recording its failed deliveries
    wait_for(
        lambda: (
            stack.sql(
                "SELECT attempts > 0 AND last_error IS NOT NULL FROM outbox"
                " WHERE key = %s AND published_at IS NULL",
                export_id,
            )
            == [(True,)]
        ),
        timeout=60,
        what="a failed delivery to be recorded",
    )
    assert export_of(api, export_id)["state"] == "queued"
    # When a broker is back (the in-memory one gets a new address: restart its clients)
    stack.env["KAFKA_BOOTSTRAP_SERVERS"] = stack.start_broker()
    restart_services(stack, "relay", "worker", "notifier")
    # Then the waiting event is published and the export completes once, with one email
    wait_state(api, export_id, "ready")
    settle(stack)
    ready = assert_ready_once(stack, api, export_id, attempts=1)
    assert [h[1] for h in ready.history] == ["queued", "running", "ready"]
    assert metric(metrics(stack, "relay"), "orders_export_outbox_published_total") >= 3


def test_database_connection_killed_mid_copy_is_retried_and_ready_once(
    stack: LiveStack, api: httpx2.Client
) -> None:
    before = metrics(stack, "worker")
    # Given an export streaming out of PostgreSQL (~5 MB, about three seconds)
    export_id = request_export(api, {"channel": ["web", "pos"], "sort": "number"})["id"]
    wait_running(api, export_id, rows=1000)
    # When its COPY connection is terminated on the server
    killed = stack.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'orders-export-worker'"
    )
    assert killed == [(True,)]
    # Then the attempt fails as retryable, goes back to the queue, and the retry completes
    wait_state(api, export_id, "ready")
    settle(stack)
    ready = assert_ready_once(stack, api, export_id, attempts=2)
    (retry,) = [h for h in ready.history if h[:2] == ("running", "queued")]
    assert retry[2].startswith("worker:") and retry[3] == "database_unavailable"
    (event,) = events(stack, export_id, "ExportFailed")
    assert (event["code"], event["retryable"], event["final"]) == (
        "database_unavailable",
        True,
        False,
    )
    assert (
        event["message"] == "The database connection was interrupted. The export will be retried."
    )
    after = metrics(stack, "worker")

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("orders_export_failures_total", reason="database_unavailable") == 1
    assert delta("orders_export_retries_total") == 1
    assert delta("orders_export_job_duration_seconds_count", outcome="retry") == 1
    assert delta("orders_export_job_duration_seconds_count", outcome="ready") == 1


@pytest.mark.parametrize("mode", ["errors", "unreachable"])
def test_storage_failing_mid_multipart_upload_is_aborted_retried_and_ready_once(
    stack: LiveStack, api: httpx2.Client, s3_proxy: S3FaultProxy, mode: str
) -> None:
    before = metrics(stack, "worker")
    # Given a ~7 MB export (two upload parts) whose upload breaks after part 1 is stored:
    # "errors" answers HTTP 500 to the part uploads, "unreachable" drops every request
    export_id = request_export(api, {"sort": "-number" if mode == "errors" else "placed_at"})["id"]
    s3_proxy.arm(mode, export_id)
    try:
        # Then the attempt fails as retryable and goes back to the queue (for half a second)
        wait_for(
            lambda: events(stack, export_id, "ExportFailed"),
            timeout=60,
            what="the attempt to fail",
        )
        broken_key = s3_proxy.broken_key
        assert broken_key is not None and s3_proxy.faulted
        # And the automatic retry, with a new object key, completes
        wait_state(api, export_id, "ready")
    finally:
        s3_proxy.disarm()
    settle(stack)
    # "errors": minio aborted the upload, nothing is left. "unreachable": the abort could not
    # reach the server either, so one incomplete upload remains, which the bucket's lifecycle
    # rule aborts a day later (MinIO/S3 apply it; moto keeps the rule but does not run it).
    leftovers = 0 if mode == "errors" else 1
    ready = assert_ready_once(stack, api, export_id, attempts=2, leftover_uploads=leftovers)
    assert ready.storage_key != broken_key
    if mode == "unreachable":
        assert ready.leftover_uploads == [broken_key]
        assert abort_incomplete_upload_days(stack) == 1
    (retry,) = [h for h in ready.history if h[:2] == ("running", "queued")]
    assert retry[3] == "storage_unavailable"
    # with the safe error the export showed meanwhile (the same columns, the same transaction)
    (event,) = events(stack, export_id, "ExportFailed")
    assert {k: event[k] for k in ("code", "message", "retryable")} == STORAGE_FAILED
    assert event["final"] is False
    after = metrics(stack, "worker")
    failures = metric(after, "orders_export_failures_total", reason="storage_unavailable")
    assert (
        failures - metric(before, "orders_export_failures_total", reason="storage_unavailable") == 1
    )


def _states(api: httpx2.Client, ids: list[str]) -> list[str]:
    return sorted(export_of(api, i)["state"] for i in ids)


def _restart_redis(stack: LiveStack, *, lose_data: bool, down_until: Any = None) -> None:
    port = stack.redis.port
    stack.redis.stop()
    if lose_data:
        shutil.rmtree(stack.redis.data_dir)
    if down_until is not None:
        wait_for(down_until, timeout=60, what="the outage to take effect")
    stack.redis.requested_port = port  # clients keep their REDIS_URL
    assert stack.redis.start() == stack.env["REDIS_URL"]


def test_redis_restarted_while_exports_run_and_wait_for_a_worker(
    stack: LiveStack, api: httpx2.Client
) -> None:
    # Given three ~25,000-row exports of three accounts: two run (two worker threads), one
    # waits for a free thread
    ids = [
        request_export(api, {"placed_from": "2025-03-01", "placed_to": "2025-12-31"}, slug)["id"]
        for slug in ("acme", "beta", "gamma")
    ]
    wait_for(
        lambda: _states(api, ids) == ["queued", "running", "running"],
        timeout=60,
        what="two exports running, one queued",
    )
    # When Redis restarts (keeping its append-only file) and stays down until a running export
    # has finished, so that its acknowledgement meets the outage
    _restart_redis(stack, lose_data=False, down_until=lambda: "ready" in _states(api, ids))
    # Then every export completes once, without waiting for housekeeping (which re-sends work
    # only after an hour in this stack), and no actor crashed on the outage
    for export_id in ids:
        wait_state(api, export_id, "ready")
    settle(stack)
    for export_id in ids:
        assert_ready_once(stack, api, export_id, attempts=1)


def test_redis_restarted_empty_lost_work_is_sent_again(
    stack: LiveStack, api: httpx2.Client
) -> None:
    # Given three exports of one account: one runs, two wait their turn (one running export
    # per account) with their work messages in Dramatiq's delay queue
    ids = [
        request_export(api, {"placed_from": f"2026-{a}", "placed_to": f"2026-{b}"})["id"]
        for a, b in (("01-01", "10-31"), ("03-01", "12-31"), ("02-01", "11-30"))
    ]
    wait_for(
        lambda: _states(api, ids) == ["queued", "queued", "running"],
        timeout=60,
        what="one export running, two queued",
    )
    # When the worker stops (the running export finishes, the rest of its messages go back to
    # Redis) and Redis comes back without its data
    stack.kill_service("worker", signal.SIGTERM)
    assert _states(api, ids) == ["queued", "queued", "ready"]
    _restart_redis(stack, lose_data=True)
    assert dramatiq_backlog(stack).waiting == 0  # nothing is left to run the two
    # Then a worker whose housekeeping re-sends work of jobs queued over 10 s (the minimum;
    # 120 s by default) sends it again, and each export completes once
    saved = stack.env["EXPORT_REQUEUE_AFTER_SECONDS"]
    stack.env["EXPORT_REQUEUE_AFTER_SECONDS"] = "10"
    try:
        stack.start_service("worker")
        for export_id in ids:
            wait_state(api, export_id, "ready", timeout=120)
        settle(stack)
    finally:
        stack.env["EXPORT_REQUEUE_AFTER_SECONDS"] = saved
        stack.restart_service("worker")
    for export_id in ids:
        assert_ready_once(stack, api, export_id, attempts=1)


def test_smtp_down_when_the_export_is_ready_sends_one_email_once_it_is_back(
    stack: LiveStack, api: httpx2.Client
) -> None:
    port = int(stack.env["SMTP_URL"].rsplit(":", 1)[1])
    stack.mail.stop()
    try:
        second_half = {"placed_from": "2025-07-01", "placed_to": "2025-12-31"}
        export_id = request_export(api, second_half)["id"]
        wait_state(api, export_id, "ready")

        def delivery_failed() -> Any:
            rows = stack.sql(
                "SELECT attempts, last_error FROM notifications WHERE export_id = %s", export_id
            )
            return rows and rows[0][0] >= 1 and rows[0]

        _, last_error = wait_for(delivery_failed, timeout=60, what="a failed delivery")
        assert last_error.startswith("SMTP delivery failed") and stack.emails_about(export_id) == []
    finally:
        # When the mail server is back, on the address the notifier was started with
        stack.mail.requested_port = port
        stack.mail.start()
    # Then the email goes out once, and never a second time
    wait_for(lambda: stack.emails_about(export_id), timeout=60, what="the ready email")
    settle(stack)
    assert_ready_once(stack, api, export_id, attempts=1)
    samples = metrics(stack, "notifier")
    # The failed deliveries were retried by the consumer loop, and no email was given up
    failed = metric(samples, "orders_export_consumer_messages_total", outcome="failed")
    assert failed >= 1
    assert metric(samples, "orders_export_notifications_total", kind="ready", outcome="failed") == 0
