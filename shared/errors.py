"""One error hierarchy for the whole product.

The domain raises these; each entry point maps them to its own medium (HTTP status codes live in
``services/api/errors.py``, exit codes in ``shared/cli.py``).
"""

from __future__ import annotations

from typing import Any


class OrdersExportError(Exception):
    """Base class for every error this product raises on purpose."""

    #: A stable, machine-readable code (part of the HTTP contract).
    code = "error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ConfigurationError(OrdersExportError):
    """A required setting is missing or malformed."""

    code = "configuration_error"


class ValidationError(OrdersExportError):
    """User input was rejected; ``field`` names the offending input."""

    code = "validation_error"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field=field)
        self.field = field


class NotFound(OrdersExportError):
    """The thing does not exist, or the caller may not know that it exists."""

    code = "not_found"


class Unauthenticated(OrdersExportError):
    """No valid session or bearer token came with the request."""

    code = "unauthenticated"


class Forbidden(OrdersExportError):
    """The caller is known but lacks the role the action needs."""

    code = "forbidden"


class CsrfFailed(Forbidden):
    """A cookie-authenticated write came without a valid CSRF token."""

    code = "csrf_failed"


class TryLater(OrdersExportError):
    """An error that passes: the client may try again after ``retry_after`` seconds (the HTTP
    answer carries ``Retry-After``)."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


class TooManyAttempts(TryLater):
    """Too many attempts in a short time (login throttling)."""

    code = "too_many_attempts"


class BodyTooLarge(OrdersExportError):
    """The request body is larger than MAX_REQUEST_BODY_BYTES."""

    code = "body_too_large"


class Overloaded(TryLater):
    """The process is busy with as much of this work as it takes at once (e.g. password checks)."""

    code = "overloaded"


class Conflict(OrdersExportError):
    """The action does not fit the current state (e.g. retrying a running export)."""

    code = "conflict"


class InvalidTransition(Conflict):
    """An export state change that the state machine does not allow."""

    code = "invalid_transition"


class ExportsDisabled(OrdersExportError):
    """The ``exports_enabled`` switch is off."""

    code = "exports_disabled"


class TooManyActiveExports(TryLater):
    """The user already has the maximum number of queued and running exports."""

    code = "too_many_active_exports"


class TooManyInlineExports(TooManyActiveExports):
    """The user started EXPORT_MAX_INLINE_PER_MINUTE exports inside requests in the last minute."""

    code = "too_many_inline_exports"


class TooManyRows(OrdersExportError):
    """The export would exceed the hard row cap (never silently truncated)."""

    code = "too_many_rows"


class InlineExportFailed(OrdersExportError):
    """A small export made inside the request failed for good (the job records why)."""

    code = "export_failed"


class LinkExpired(OrdersExportError):
    """A signed download link is past its expiry."""

    code = "link_expired"


class FileExpired(OrdersExportError):
    """The export's file has expired and was deleted."""

    code = "file_expired"


class BadSignature(Forbidden):
    """A download link's signature does not verify."""

    code = "bad_signature"


class UndecodableEvent(OrdersExportError):
    """A Kafka message that is not a known event (goes to the dead-letter topic)."""

    code = "undecodable_event"


class DatabaseUnavailable(TryLater):
    """The database cannot be had right now: it refuses or drops connections, or every pooled
    connection stayed busy for the pool's whole wait."""

    code = "database_unavailable"


class StorageError(OrdersExportError):
    """Object storage failed (unreachable, refused, or an object is missing)."""

    code = "storage_error"
