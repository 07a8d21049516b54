"""The failure-code table: classification of exceptions, messages and advice."""

from __future__ import annotations

import psycopg
import pytest
from dramatiq.middleware import TimeLimitExceeded
from psycopg import errors as pg_errors

from shared.errors import StorageError, TooManyRows
from shared.failures import (
    ADVICE_TEXT,
    FAILURE_CODES,
    Advice,
    advice_for,
    advice_text,
    classify,
    error_class_of,
)
from shared.models import ErrorClass


@pytest.mark.parametrize(
    ("exc", "code", "error_class"),
    [
        (TimeLimitExceeded(), "time_limit", ErrorClass.USER),
        (TooManyRows("more than 10 rows"), "too_many_rows", ErrorClass.USER),
        (pg_errors.QueryCanceled("statement timeout"), "query_timeout", ErrorClass.USER),
        (psycopg.OperationalError("gone"), "database_unavailable", ErrorClass.RETRYABLE),
        (StorageError("down"), "storage_unavailable", ErrorClass.RETRYABLE),
        (RuntimeError("bug"), "internal_error", ErrorClass.ENGINEERING),
    ],
)
def test_every_exception_lands_on_a_row_of_the_table(
    exc: BaseException, code: str, error_class: ErrorClass
) -> None:
    failure = classify(exc, canceled_by_us=False)
    assert (failure.code, failure.error_class) == (code, error_class)
    assert FAILURE_CODES[code] is failure.kind and error_class_of(code) is error_class


def test_too_many_rows_keeps_the_message_of_the_limit_it_hit() -> None:
    failure = classify(TooManyRows("more than 1,000 rows"), canceled_by_us=False)
    assert failure.message_for(final=True) == "more than 1,000 rows"


def test_retryable_codes_say_something_else_once_the_retries_are_used_up() -> None:
    for row in FAILURE_CODES.values():
        if row.error_class is ErrorClass.RETRYABLE:
            assert row.final_message and row.final_message != row.message
            assert row.advice is Advice.RETRY
        else:
            assert row.final_message is None and row.advice is not Advice.RETRY
    failure = classify(StorageError("x"), canceled_by_us=False)
    assert "retried" in failure.message_for(final=False)
    assert "retried" not in failure.message_for(final=True)


@pytest.mark.parametrize(
    ("code", "retryable", "advice"),
    [
        ("storage_unavailable", True, Advice.RETRY),
        ("worker_lost", True, Advice.RETRY),
        ("query_timeout", False, Advice.NARROW),
        ("too_many_rows", False, Advice.NARROW),
        ("time_limit", False, Advice.NARROW),
        ("internal_error", False, Advice.SUPPORT),
        # An older row: a code no longer in the table, or a retryable one failed for good.
        ("gone_code", False, Advice.SUPPORT),
        (None, False, Advice.SUPPORT),
        ("storage_unavailable", False, Advice.SUPPORT),
    ],
)
def test_advice_by_code_and_class(code: str | None, retryable: bool, advice: Advice) -> None:
    assert advice_for(code, retryable=retryable) is advice


def test_support_advice_names_the_export() -> None:
    text = advice_text("internal_error", retryable=False, export_id="e-123")
    assert text == ADVICE_TEXT[Advice.SUPPORT].format(id="e-123") and "e-123" in text
    assert error_class_of("no_such_code") is None
