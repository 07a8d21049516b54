"""The one table that maps domain errors to HTTP, and the JSON error body."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from sqlalchemy import exc as sa_exc
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from services.api.state import api_state
from shared import errors, wire

log = logging.getLogger(__name__)

#: When a client may try again after the database was unavailable (seconds).
DATABASE_RETRY_AFTER_SECONDS = 5
#: What the database failing to answer looks like from a request: the driver's connection and
#: operational errors (refused, dropped, canceled) and the pool's wait running out.
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.TimeoutError,
    psycopg.OperationalError,
)

#: Domain error class -> HTTP status. The most specific class in an error's MRO wins.
STATUS_BY_ERROR: dict[type[errors.OrdersExportError], int] = {
    errors.ValidationError: 422,
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.CsrfFailed: 403,
    errors.NotFound: 404,
    errors.TooManyAttempts: 429,
    errors.TooManyActiveExports: 429,
    errors.TooManyRows: 422,
    errors.BodyTooLarge: 413,
    errors.Conflict: 409,
    errors.LinkExpired: 410,
    errors.FileExpired: 410,
    errors.ExportsDisabled: 503,
    errors.Overloaded: 503,
    errors.StorageError: 503,
    errors.DatabaseUnavailable: 503,
    errors.InlineExportFailed: 503,
    errors.ConfigurationError: 500,
}


def status_for(exc: errors.OrdersExportError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 400


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON error body (``wire.ErrorBody``); ``extra`` holds ``field`` and the like."""
    detail = wire.ErrorDetail(code=code, message=message, **extra)
    return wire.ErrorBody(error=detail).model_dump(mode="json", exclude_unset=True)


def wants_html(request: Request) -> bool:
    """Browser page routes answer in HTML; everything under /api answers JSON."""
    if request.url.path.startswith("/api/"):
        return False
    return "text/html" in request.headers.get("accept", "")


async def handle_domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.OrdersExportError)
    status = status_for(exc)
    if isinstance(exc, errors.Unauthenticated) and wants_html(request):
        from services.api.auth import login_redirect

        return login_redirect(request)
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(retry_after, int):
        headers["Retry-After"] = str(retry_after)
    if wants_html(request):
        return api_state(request).templates.TemplateResponse(
            request,
            "error.html",
            {"status": status, "message": exc.message},
            status_code=status,
            headers=headers,
        )
    return JSONResponse(error_body(exc.code, exc.message, **exc.details), status, headers=headers)


async def handle_database_error(request: Request, exc: Exception) -> Response:
    """A request the database could not serve: 503 ``database_unavailable`` with Retry-After,
    logged with the error's class (never its SQL or values), never a 500 with a trace."""
    cause = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    log.warning(
        "api: database unavailable for %s %s: %s",
        request.method,
        request.url.path,
        type(cause).__name__,
    )
    unavailable = errors.DatabaseUnavailable(
        "The database is not answering right now; please try again in a few seconds.",
        retry_after=DATABASE_RETRY_AFTER_SECONDS,
    )
    return await handle_domain_error(request, unavailable)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    from starlette.exceptions import HTTPException

    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        error_body(code, str(exc.detail)), exc.status_code, headers=dict(exc.headers or {})
    )


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)
