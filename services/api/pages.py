"""Export pages for browsers: the export's own page and the forms that work without JavaScript.

Every form posts the session's CSRF token and answers 303 back to a page that shows the result;
``static/exports.js`` does the same through the JSON API without leaving the page. The rules are
the API's: the same use cases in ``shared.exports`` decide.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from urllib.parse import quote

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from services.api import export_routes, exportviews
from services.api.auth import (
    CSRF_FIELD,
    Caller,
    authenticated,
    for_caller,
    require_caller,
    safe_next,
)
from services.api.errors import redirect
from services.api.state import api_state
from shared.errors import (
    Conflict,
    ExportsDisabled,
    OrdersExportError,
    TooManyActiveExports,
    TooManyRows,
    Unauthenticated,
    ValidationError,
)
from shared.filters import OrderFilters, from_snapshot, parse_filter_object
from shared.models import ExportState

#: Fields of the Export CSV form that are options, not filters.
OPTION_FIELDS = frozenset({"utf8_bom", "compression"})
#: Refusals the user can act on: shown on the page they came from, not as an error page.
SHOWN_ON_PAGE: tuple[type[OrdersExportError], ...] = (
    Conflict,
    ExportsDisabled,
    TooManyActiveExports,
    TooManyRows,
)


def _export_page(request: Request, *, confirm_delete: bool = False) -> Response:
    export_id = request.path_params["export_id"]
    return for_caller(
        request,
        lambda session, caller: exportviews.export_page(
            request, session, caller, export_id, confirm_delete=confirm_delete
        ),
    )


async def export_page(request: Request) -> Response:
    """``GET /exports/{id}``: the export, live; the target of the links in emails."""
    return await run_in_threadpool(_export_page, request)


def _items(
    request: Request, draw: Callable[[Request, Session, Caller, str], Response], key: str
) -> Response:
    """The items ``draw`` makes of the path parameter ``key``, for the caller (one session)."""
    with api_state(request).sessions() as session:
        caller = require_caller(request, session)
        return draw(request, session, caller, request.path_params[key])


async def panel_items(request: Request) -> Response:
    """``GET /accounts/{slug}/exports/panel``: the Exports panel's items, as HTML."""
    return await run_in_threadpool(_items, request, exportviews.account_items, "slug")


async def export_items(request: Request) -> Response:
    """``GET /exports/{id}/panel``: the export's item on its own page, as HTML."""
    return await run_in_threadpool(_items, request, exportviews.export_items, "export_id")


def _submitted_csrf(form: FormData) -> str | None:
    value = form.get(CSRF_FIELD)
    return value if isinstance(value, str) and value else None


def filters_object(form: FormData) -> dict[str, object]:
    """The form's filter fields as the API's ``filters`` object (validated by the use case)."""
    fields: dict[str, object] = {}
    for name in form:
        if name == CSRF_FIELD or name in OPTION_FIELDS:
            continue
        values = [v for v in form.getlist(name) if isinstance(v, str)]
        fields[name] = values[0] if len(values) == 1 else values
    return fields


def options_object(form: FormData) -> dict[str, object]:
    """The form's option checkboxes as the API's ``options`` object (unticked: the default)."""
    options: dict[str, object] = {}
    if form.get("utf8_bom") == "true":
        options["utf8_bom"] = True
    compression = form.get("compression")
    if isinstance(compression, str) and compression:
        options["compression"] = compression  # validated by the use case
    return options


def _login_then(path: str) -> Response:
    """Logged out meanwhile: log in, then back to the page the button was on (not the POST)."""
    return redirect(f"/login?next={quote(path, safe='')}")


def _request_export(request: Request, caller: Caller, form: FormData) -> Response:
    slug = request.path_params["slug"]
    fields = filters_object(form)
    try:
        created = export_routes.create(
            request,
            caller,
            {"filters": fields, "options": options_object(form)},
            None,
            submitted_csrf=_submitted_csrf(form),
        )
    except Unauthenticated:
        return _login_then(f"/accounts/{slug}/orders")
    except SHOWN_ON_PAGE as exc:
        exportviews.flash(request, exc.message, kind="error")
        try:
            return redirect(exportviews.report_url(slug, parse_filter_object(fields)))
        except ValidationError:
            return redirect(exportviews.report_url(slug, OrderFilters()))
    if created.job.state is ExportState.FAILED:  # made in the request, and it failed
        exportviews.flash(request, f"Export failed: {created.job.error_message}", kind="error")
    else:
        exportviews.flash(
            request, exportviews.REQUESTED[export_routes.STATUSES[created.disposition]]
        )
    return redirect(
        exportviews.report_url(created.account.slug, from_snapshot(created.job.filters))
    )


async def request_export(request: Request) -> Response:
    """``POST /accounts/{slug}/exports``: the Export CSV button, with the applied filters."""
    caller = await run_in_threadpool(authenticated, request)  # before reading the form
    if caller is None:
        return _login_then(f"/accounts/{request.path_params['slug']}/orders")
    form = await request.form()
    return await run_in_threadpool(_request_export, request, caller, form)


def _act(request: Request, caller: Caller, action: str, form: FormData) -> Response:
    """The form's action by ``caller`` (identified before the form was read)."""
    export_id = request.path_params["export_id"]
    target = form.get("next")
    back = safe_next(target if isinstance(target, str) else None)
    if back == "/":
        back = f"/exports/{export_id}"
    try:
        export_routes.act(request, action, caller=caller, submitted_csrf=_submitted_csrf(form))
    except Unauthenticated:
        return _login_then(back)
    except SHOWN_ON_PAGE as exc:
        exportviews.flash(request, exc.message, kind="error")
    else:
        done = {"retry": "retried", "cancel": "canceled", "delete_file": "deleted"}[action]
        exportviews.flash(request, exportviews.MESSAGES[done])
    return redirect(back)


async def _form_action(request: Request, action: str) -> Response:
    caller = await run_in_threadpool(authenticated, request)  # before reading the form
    if caller is None:
        return _login_then(f"/exports/{request.path_params['export_id']}")
    form = await request.form()
    return await run_in_threadpool(_act, request, caller, action, form)


async def retry_export(request: Request) -> Response:
    """``POST /exports/{id}/retry``: Retry / Re-export, then back to where the button was."""
    return await _form_action(request, "retry")


async def cancel_export(request: Request) -> Response:
    """``POST /exports/{id}/cancel``, then back to where the button was."""
    return await _form_action(request, "cancel")


async def confirm_delete_file(request: Request) -> Response:
    """``GET /exports/{id}/delete-file``: the export's page asking to confirm Delete file."""
    return await run_in_threadpool(functools.partial(_export_page, request, confirm_delete=True))


async def delete_file(request: Request) -> Response:
    """``POST /exports/{id}/delete-file``: the confirmed Delete file, then back to the page."""
    return await _form_action(request, "delete_file")
