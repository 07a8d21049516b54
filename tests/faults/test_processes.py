"""Worker process faults: killed outright mid-upload or between its upload and its ready
commit, stopped politely mid-export, and an export that outlives the statement timeout. Each
ends in exactly one right file and one email (or one clean, user-fixable failure), with attempts
and history that tell what happened."""

from __future__ import annotations

import signal
import time

import httpx2
import psycopg
import pytest

from services.worker.main import HAND_BACK_SECONDS
from shared.settings import Settings
from tests.faults.support import (
    abort_incomplete_upload_days,
    assert_ready_once,
    events,
    history,
    metric,
    metrics,
    objects_of,
    poll_until,
    service_settings,
    settle,
    uploads_of,
)
from tests.support.exports import export_of, request_export, wait_running, wait_state
from tests.support.stack import LiveStack, body_text

pytestmark = pytest.mark.e2e


def test_worker_killed_mid_upload_is_rescued_and_the_export_completes_once(
    stack: LiveStack, api: httpx2.Client
) -> None:
    # Given a ~8 MB export whose multipart upload has begun (part 1 is on its way or stored)
    export_id = request_export(api, {"sort": "number"})["id"]
    poll_until(
        lambda: uploads_of(stack, export_id) and export_of(api, export_id)["state"] == "running",
        timeout=60,
        what="the multipart upload to start",
    )
    # When the worker dies without any chance to clean up (SIGKILL)
    stack.kill_service("worker")
    assert objects_of(stack, export_id) == []  # nothing partial is visible
    assert export_of(api, export_id)["download_url"] is None
    stack.start_service("worker")
    # Then its lease expires, the rescuer puts it back in the queue and it runs again, once
    wait_state(api, export_id, "ready")
    settle(stack)
    ready = assert_ready_once(stack, api, export_id, attempts=2, leftover_uploads=1)
    assert ("running", "queued", "system:rescuer", "lease_expired") in ready.history
    (lost,) = events(stack, export_id, "ExportFailed")
    assert (lost["code"], lost["retryable"], lost["final"]) == ("worker_lost", True, False)
    # The killed worker could not abort its upload: the bucket's lifecycle rule does that
    # (MinIO/S3 apply it; the local moto server keeps the rule but does not run it).
    assert abort_incomplete_upload_days(stack) == 1
    # And the new worker's counters tell the story: one rescue, one retry, one good run
    samples = metrics(stack, "worker")
    assert metric(samples, "orders_export_failures_total", reason="worker_lost") == 1
    assert metric(samples, "orders_export_retries_total") == 1
    assert metric(samples, "orders_export_job_duration_seconds_count", outcome="ready") == 1
    assert metric(samples, "orders_export_rows_total") == ready.export["row_count"]


def test_worker_killed_after_its_upload_before_ready_leaves_no_second_file(
    stack: LiveStack, api: httpx2.Client
) -> None:
    # Given a running export whose row the test holds locked, so that the worker's progress
    # and ready updates wait: its upload completes, its ready commit cannot happen
    export_id = request_export(api, {"sort": "placed_at", "placed_from": "2000-01-01"})["id"]
    wait_running(api, export_id)
    with psycopg.connect(stack.database_url) as blocker:
        blocker.execute("SELECT 1 FROM export_jobs WHERE id = %s FOR UPDATE", (export_id,))
        poll_until(
            lambda: objects_of(stack, export_id),
            timeout=60,
            what="the first attempt's file to be stored",
        )
        (first_file,) = objects_of(stack, export_id)
        # When the worker dies in that window (SIGKILL: no cleanup of its own)
        stack.kill_service("worker")
        blocker.rollback()
    stack.start_service("worker")
    # Then the rescuer requeues the export, the second attempt makes the file, and the first
    # attempt's file, which nothing points to, is deleted (it holds customer data)
    wait_state(api, export_id, "ready")
    settle(stack)
    ready = assert_ready_once(stack, api, export_id, attempts=2)
    assert ready.storage_key != first_file
    assert ("running", "queued", "system:rescuer", "lease_expired") in ready.history


def test_worker_stopped_with_sigterm_finishes_or_hands_back_its_export(
    stack: LiveStack, api: httpx2.Client
) -> None:
    # Given an export that is running (~7 MB, about four seconds of streaming)
    export_id = request_export(api, {"sort": "-total"})["id"]
    wait_running(api, export_id)
    # When the worker is asked to stop (a deploy): running exports get the shutdown grace, so
    # the export either finishes or is handed back (or, SIGKILLed by the harness, rescued)
    worker = stack.services["worker"]
    ((signaled_at,),) = stack.sql("SELECT clock_timestamp()")
    started = time.monotonic()
    stack.kill_service("worker", signal.SIGTERM)
    assert worker.exit_code == 0  # a clean exit, not a crash
    grace = Settings.model_fields["worker_shutdown_grace_seconds"].default
    assert time.monotonic() - started < grace + HAND_BACK_SECONDS + 20
    state_at_exit = export_of(api, export_id)["state"]
    assert state_at_exit in ("ready", "running", "queued")
    stack.start_service("worker")
    wait_state(api, export_id, "ready")
    settle(stack)
    # Then, either way, one file with the right rows and one email
    finished_in_shutdown = state_at_exit == "ready"
    handed_back = any(h[1] == "queued" and h[3] == "shutdown" for h in history(stack, export_id))
    attempts = 1 if finished_in_shutdown or handed_back else 2  # a hand-back refunds its attempt
    ready = assert_ready_once(stack, api, export_id, attempts=attempts)
    samples = metrics(stack, "worker")
    runs_after_restart = metric(samples, "orders_export_job_duration_seconds_count")
    if finished_in_shutdown:
        # The export this test sizes for finishes well within the shutdown grace period
        assert [h[1] for h in ready.history] == ["queued", "running", "ready"]
        ((finished_at,),) = stack.sql(
            "SELECT finished_at FROM export_jobs WHERE id = %s", export_id
        )
        assert finished_at > signaled_at  # it was still running when the signal came
        assert runs_after_restart == 0  # nothing ran it a second time
    elif handed_back:
        assert [h[1] for h in ready.history] == ["queued", "running", "queued", "running", "ready"]
        assert runs_after_restart == 1
    else:
        assert ("running", "queued", "system:rescuer", "lease_expired") in ready.history
        assert runs_after_restart == 1


def test_export_beyond_the_statement_timeout_fails_cleanly_with_a_fixable_message(
    stack: LiveStack, api: httpx2.Client
) -> None:
    # Given workers whose export query may run for one second only
    with service_settings(stack, "worker", EXPORT_STATEMENT_TIMEOUT_SECONDS="1"):
        # When an export needs longer (~4 MB at ~2 MB/s)
        export_id = request_export(api, {"channel": ["web"], "sort": "placed_at"})["id"]
        failed = wait_state(api, export_id, "failed", "ready")
        settle(stack)
        samples = metrics(stack, "worker")
    # Then it fails at once, for good, with a message the user can act on
    assert failed["error"] == {
        "code": "query_timeout",
        "message": "The export took longer than allowed. Narrow the filters (for example a "
        "shorter date range) and try again.",
        "retryable": False,
    }
    assert failed["attempts"] == 1 and failed["download_url"] is None
    steps = history(stack, export_id)
    assert [(h[0], h[1], h[3]) for h in steps] == [
        (None, "queued", "requested"),
        ("queued", "running", None),
        ("running", "failed", "query_timeout"),
    ]
    assert steps[1][2].startswith("worker:") and steps[2][2] == steps[1][2]
    (event,) = events(stack, export_id, "ExportFailed")
    assert (event["code"], event["retryable"], event["final"]) == ("query_timeout", False, True)
    assert objects_of(stack, export_id) == [] and uploads_of(stack, export_id) == []
    # And exactly one email says why and what to do, without anything internal
    (mail,) = stack.emails_about(export_id)
    assert "failed" in mail["Subject"].lower()
    text = body_text(mail)
    assert "Narrow the filters" in text and "change the filters" in text
    assert "statement" not in text.lower() and "COPY" not in text
    assert metric(samples, "orders_export_failures_total", reason="query_timeout") == 1
    assert metric(samples, "orders_export_retries_total") == 0
