"""Support on the live stack: a failed export diagnosed by ``orders-export exports show``,
retried by ``orders-export exports retry``, and ready."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.support.exports import request_export, wait_state
from tests.support.stack import LiveStack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

#: Demo orders: an export of all of them is above the async threshold (a background job).
ORDERS = 12_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    live = LiveStack(Path(tmp_path_factory.mktemp("support")), orders=ORDERS)
    try:
        live.start()
        # The worker prepares the bucket before it serves metrics: up, it survives an outage.
        wait_for(lambda: _serves(live.metrics_url("worker")), timeout=60, what="the worker")
        yield live
    finally:
        live.stop()


def _serves(url: str) -> bool:
    try:
        return httpx2.get(url, timeout=2, trust_env=False).status_code == 200
    except httpx2.HTTPError:
        return False


def cli(stack: LiveStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "exports", *args],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def show(stack: LiveStack, export_id: str) -> dict[str, Any]:
    result = cli(stack, "show", export_id, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_failed_export_is_diagnosed_retried_by_support_and_ready(
    stack: LiveStack, api: httpx2.Client
) -> None:
    # Given object storage is down while an admin's background export runs
    stack.stop_s3()
    try:
        export_id = request_export(api, {})["id"]
        wait_state(api, export_id, "failed")
    finally:
        stack.start_s3()
    # When support looks at it (once the relay has published its events)
    body = wait_for(
        lambda: (b := show(stack, export_id)) and all(e["published"] for e in b["events"]) and b,
        timeout=30,
        what="every event published",
    )
    # Then the verdict, the attempts and the events tell the story
    assert body["verdict"]["verdict"] == "user_can_fix"
    assert "storage_unavailable" in body["verdict"]["reason"]
    attempts = body["attempts"]
    assert [a["outcome"] for a in attempts] == ["retry", "failed"]  # EXPORT_MAX_ATTEMPTS=2
    assert all(a["error"]["code"] == "storage_unavailable" for a in attempts)
    assert all(a["error"]["class"] == "retryable" and a["worker_id"] for a in attempts)
    assert [e["type"] for e in body["events"]] == [
        "ExportRequested", "ExportStarted", "ExportFailed", "ExportStarted", "ExportFailed",
    ]  # fmt: skip
    text = cli(stack, "show", export_id).stdout
    assert "verdict: user can fix" in text
    # When support retries it
    retried = cli(stack, "retry", export_id, "--as", "oncall")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == f"export {export_id}: failed -> queued (by support:oncall)"
    # Then the workers make it ready, and the history says who retried it
    wait_state(api, export_id, "ready")
    after = show(stack, export_id)
    assert after["verdict"]["verdict"] == "fine"
    assert after["export"]["file"]["size_bytes"] > 0 and after["export"]["row_count"] == ORDERS
    assert {"from": "failed", "to": "queued", "actor": "support:oncall", "detail": "retry"} in [
        {k: h[k] for k in ("from", "to", "actor", "detail")} for h in after["history"]
    ]
    assert [a["outcome"] for a in after["attempts"]] == ["retry", "failed", "ready"]
    # And a second retry is refused by the state machine
    again = cli(stack, "retry", export_id, "--as", "oncall")
    assert again.returncode == 4 and "this one is ready" in again.stderr
