"""Why an export failed: one table of failure codes, and the classification of exceptions.

Each code has its class (who can fix it), the message users see (and, for retryable codes, the
message once the automatic retries are used up) and the advice the pages and the failure email
give. Nothing here ever carries SQL, traces or secrets.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import psycopg
from dramatiq.middleware import TimeLimitExceeded
from psycopg import errors as pg_errors
from sqlalchemy import exc as sa_errors

from shared.errors import StorageError, TooManyRows
from shared.models import ErrorClass


class Advice(enum.StrEnum):
    """What the user is told to do about a failed export."""

    RETRY = "retry"
    NARROW = "narrow"
    SUPPORT = "support"


#: The words of each advice (``{id}`` is the export's id).
ADVICE_TEXT = {
    Advice.RETRY: "The automatic retries are used up. This is usually a temporary problem on our "
    "side: retry the export.",
    Advice.NARROW: "Narrow the filters (for example a shorter date range) and export again.",
    Advice.SUPPORT: "Retrying will not help: contact support and quote export {id}.",
}
_TOO_LONG = (
    "The export took longer than allowed. Narrow the filters (for example a shorter date range) "
    "and try again."
)


@dataclass(frozen=True)
class FailureCode:
    """One row of the table."""

    code: str
    error_class: ErrorClass
    message: str
    advice: Advice
    #: What to say instead once the automatic retries are used up (retryable codes only).
    final_message: str | None = None


FAILURE_CODES: dict[str, FailureCode] = {
    row.code: row
    for row in (
        FailureCode("time_limit", ErrorClass.USER, _TOO_LONG, Advice.NARROW),
        FailureCode(
            "too_many_rows",
            ErrorClass.USER,
            "The export would have more rows than allowed. Narrow the filters and try again.",
            Advice.NARROW,
        ),
        FailureCode("query_timeout", ErrorClass.USER, _TOO_LONG, Advice.NARROW),
        FailureCode(
            "database_unavailable",
            ErrorClass.RETRYABLE,
            "The database connection was interrupted. The export will be retried.",
            Advice.RETRY,
            "The database connection was interrupted on every attempt. Retry the export in a "
            "few minutes.",
        ),
        FailureCode(
            "storage_unavailable",
            ErrorClass.RETRYABLE,
            "The file could not be stored. The export will be retried.",
            Advice.RETRY,
            "The file could not be stored on any attempt. Retry the export in a few minutes.",
        ),
        FailureCode(
            "worker_lost",
            ErrorClass.RETRYABLE,
            "The export worker stopped unexpectedly. It will be retried.",
            Advice.RETRY,
            "The export worker stopped unexpectedly.",
        ),
        FailureCode(
            "internal_error",
            ErrorClass.ENGINEERING,
            "An unexpected error stopped the export. Please contact support.",
            Advice.SUPPORT,
        ),
    )
}
#: The code of a worker that vanished mid-export (housekeeping's rescue).
WORKER_LOST = FAILURE_CODES["worker_lost"]


@dataclass(frozen=True)
class Failure:
    """A classified failure: its table row, and the message of this very failure."""

    kind: FailureCode
    message: str

    @property
    def code(self) -> str:
        return self.kind.code

    @property
    def error_class(self) -> ErrorClass:
        return self.kind.error_class

    @property
    def retryable(self) -> bool:
        return self.kind.error_class is ErrorClass.RETRYABLE

    def message_for(self, *, final: bool) -> str:
        return self.kind.final_message if final and self.kind.final_message else self.message


def failure(code: str, message: str | None = None) -> Failure:
    """The failure of a code in the table (with its own message, or the table's)."""
    kind = FAILURE_CODES[code]
    return Failure(kind, message or kind.message)


def classify(exc: BaseException, *, canceled_by_us: bool) -> Failure:
    """Turn an exception into a safe, classified failure."""
    if isinstance(exc, TimeLimitExceeded):
        return failure("time_limit")
    if isinstance(exc, TooManyRows):
        return failure("too_many_rows", exc.message)
    if isinstance(exc, pg_errors.QueryCanceled) and not canceled_by_us:
        return failure("query_timeout")
    if isinstance(exc, psycopg.OperationalError | sa_errors.OperationalError) or (
        isinstance(exc, sa_errors.DBAPIError) and exc.connection_invalidated
    ):
        return failure("database_unavailable")
    if isinstance(exc, StorageError):
        return failure("storage_unavailable")
    return failure("internal_error")


def error_class_of(code: str | None) -> ErrorClass | None:
    """The class of a code (None for a code not in the table)."""
    kind = FAILURE_CODES.get(code or "")
    return kind.error_class if kind is not None else None


def advice_for(code: str | None, *, retryable: bool) -> Advice:
    """What to do about a failure with ``code``; a code not in the table (an older row) is
    advised by its class alone."""
    if retryable:
        return Advice.RETRY
    kind = FAILURE_CODES.get(code or "")
    if kind is None or kind.advice is Advice.RETRY:
        return Advice.SUPPORT
    return kind.advice


def advice_text(code: str | None, *, retryable: bool, export_id: str) -> str:
    """The words of :func:`advice_for` for the export ``export_id``."""
    return ADVICE_TEXT[advice_for(code, retryable=retryable)].format(id=export_id)
