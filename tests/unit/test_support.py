"""The support verdict and durations."""

from __future__ import annotations

import datetime as dt

import pytest

from shared.models import ErrorClass, ExportJob, ExportState
from shared.support import (
    USER_WORDS,
    Verdict,
    diagnose,
    parse_duration,
)

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def job(state: ExportState, **values: object) -> ExportJob:
    return ExportJob(state=state, attempts=1, max_attempts=3, **values)


@pytest.mark.parametrize(
    ("export", "verdict", "runbook"),
    [
        (job(ExportState.READY), Verdict.FINE, None),
        (job(ExportState.QUEUED), Verdict.FINE, None),
        (job(ExportState.QUEUED, error_code="storage_unavailable"), Verdict.FINE, None),
        (job(ExportState.CANCELED), Verdict.FINE, None),
        (job(ExportState.EXPIRED), Verdict.FINE, None),
        (
            job(ExportState.RUNNING, lease_expires_at=NOW + dt.timedelta(seconds=20)),
            Verdict.FINE,
            None,
        ),
        (
            job(ExportState.RUNNING, lease_expires_at=NOW - dt.timedelta(minutes=5)),
            Verdict.NEEDS_ENGINEERING,
            "docs/runbook.md#ordersexportstalledjobs",
        ),
        (
            job(ExportState.FAILED, error_code="query_timeout", error_class=ErrorClass.USER),
            Verdict.USER_CAN_FIX,
            None,
        ),
        (
            job(ExportState.FAILED, error_code="worker_lost", error_class=ErrorClass.RETRYABLE),
            Verdict.USER_CAN_FIX,
            None,
        ),
        (
            job(
                ExportState.FAILED, error_code="internal_error", error_class=ErrorClass.ENGINEERING
            ),
            Verdict.NEEDS_ENGINEERING,
            "docs/runbook.md#ordersexportjobsfailing",
        ),
        (
            job(ExportState.FAILED),
            Verdict.NEEDS_ENGINEERING,
            "docs/runbook.md#ordersexportjobsfailing",
        ),
    ],
)
def test_verdict(export: ExportJob, verdict: Verdict, runbook: str | None) -> None:
    diagnosis = diagnose(export, now=NOW)
    assert (diagnosis.verdict, diagnosis.runbook) == (verdict, runbook)
    assert diagnosis.reason


def test_users_read_the_same_three_verdicts() -> None:
    assert USER_WORDS == {
        Verdict.FINE: "fine",
        Verdict.USER_CAN_FIX: "you can fix it",
        Verdict.NEEDS_ENGINEERING: "we are on it",
    }


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("30m", 1800), ("6h", 21600), ("7d", 604800)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0m", "5", "1w", "-3h", "1.5h", "h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration like"):
        parse_duration(text)
