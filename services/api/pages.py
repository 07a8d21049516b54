"""Export pages for browsers: the export's own page and the forms that work without JavaScript.

Every form posts the session's CSRF token and answers 303 back to a page that shows the result;
``static/exports.js`` does the same through the JSON API without leaving the page. The rules are
the API's: the same use cases in ``shared.exports`` decide.
"""

from __future__ import annotations

import functools
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response

from services.api import export_routes, exportviews
from services.api.auth import (
    CSRF_FIELD,
    Caller,
    identify,
    login_redirect,
    require_caller,
    safe_next,
)
from services.api.errors import redirect
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


def _caller(request: Request) -> Caller | None:
    with request.app.state.sessions() as session:
        return identify(request, session)


async def export_page(request: Request) -> Response:
    """``GET /exports/{id}``: the export, live; the target of the links in emails."""
    caller = await run_in_threadpool(_caller, request)
    if caller is None:
        return login_redirect(request)
    return await run_in_threadpool(
        exportviews.export_page, request, caller, request.path_params["export_id"]
    )


def _fragment(request: Request, **where: str) -> Response:
    with request.app.state.sessions() as session:
        caller = require_caller(request, session)
    return exportviews.panel_fragment(request, caller, **where)


async def panel_items(request: Request) -> Response:
    """``GET /accounts/{slug}/exports/panel``: the Exports panel's items, as HTML."""
    return await run_in_threadpool(_fragment, request, slug=request.path_params["slug"])


async def export_items(request: Request) -> Response:
    """``GET /exports/{id}/panel``: the export's item on its own page, as HTML."""
    return await run_in_threadpool(_fragment, request, export_id=request.path_params["export_id"])


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


def _request_export(request: Request, form: FormData) -> Response:
    slug = request.path_params["slug"]
    fields = filters_object(form)
    try:
        created = export_routes.create(
            request,
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
        exportviews.flash(request, exportviews.REQUESTED[created.status])
    return redirect(
        exportviews.report_url(created.account.slug, from_snapshot(created.job.filters))
    )


async def request_export(request: Request) -> Response:
    """``POST /accounts/{slug}/exports``: the Export CSV button, with the applied filters."""
    if await run_in_threadpool(_caller, request) is None:  # before reading the form
        return _login_then(f"/accounts/{request.path_params['slug']}/orders")
    form = await request.form()
    return await run_in_threadpool(_request_export, request, form)


def _act(request: Request, action: str, form: FormData) -> Response:
    export_id = request.path_params["export_id"]
    target = form.get("next")
    back = safe_next(target if isinstance(target, str) else None)
    if back == "/":
        back = f"/exports/{export_id}"
    try:
        export_routes.act(request, action, submitted_csrf=_submitted_csrf(form))
    except Unauthenticated:
        return _login_then(back)
    except SHOWN_ON_PAGE as exc:
        exportviews.flash(request, exc.message, kind="error")
    else:
        done = {"retry": "retried", "cancel": "canceled", "delete_file": "deleted"}[action]
        exportviews.flash(request, exportviews.MESSAGES[done])
    return redirect(back)


async def retry_export(request: Request) -> Response:
    """``POST /exports/{id}/retry``: Retry / Re-export, then back to where the button was."""
    if await run_in_threadpool(_caller, request) is None:  # before reading the form
        return _login_then(f"/exports/{request.path_params['export_id']}")
    form = await request.form()
    return await run_in_threadpool(_act, request, "retry", form)


async def cancel_export(request: Request) -> Response:
    """``POST /exports/{id}/cancel``, then back to where the button was."""
    if await run_in_threadpool(_caller, request) is None:  # before reading the form
        return _login_then(f"/exports/{request.path_params['export_id']}")
    form = await request.form()
    return await run_in_threadpool(_act, request, "cancel", form)


async def confirm_delete_file(request: Request) -> Response:
    """``GET /exports/{id}/delete-file``: the export's page asking to confirm Delete file."""
    caller = await run_in_threadpool(_caller, request)
    if caller is None:
        return login_redirect(request)
    return await run_in_threadpool(
        functools.partial(
            exportviews.export_page,
            request,
            caller,
            request.path_params["export_id"],
            confirm_delete=True,
        )
    )


async def delete_file(request: Request) -> Response:
    """``POST /exports/{id}/delete-file``: the confirmed Delete file, then back to the page."""
    form = await request.form()
    return await run_in_threadpool(_act, request, "delete_file", form)
