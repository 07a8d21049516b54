"""The orders report: JSON API and HTML page, both from ``shared.report``."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import orjson
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from services.api import exportviews
from services.api.auth import Caller, csrf_token, for_caller, require_caller
from services.api.state import api_state
from shared.access import account_for, accounts_of
from shared.columns import COLUMNS, Kind
from shared.errors import ValidationError
from shared.filters import SORT_LABELS, SORTS, OrderFilters, parse_filters
from shared.models import ORDER_CHANNELS, ORDER_STATUSES, Account
from shared.report import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, ReportPage, column_headers, fetch_page

#: Query parameters of the report that are not filters.
PAGING_PARAMS = ("limit", "cursor")


#: Columns rendered right-aligned in the HTML table.
NUMERIC_KEYS = frozenset(c.key for c in COLUMNS if c.kind is Kind.NUMBER)


def _last(raw: dict[str, list[str]], name: str) -> str | None:
    values = raw.get(name) or [""]
    return values[-1] or None


def _raw_params(request: Request) -> dict[str, list[str]]:
    return {key: request.query_params.getlist(key) for key in request.query_params}


def parse_limit(values: list[str]) -> int:
    if not values or values[-1] == "":
        return DEFAULT_PAGE_SIZE
    text = values[-1]
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_PAGE_SIZE:
        raise ValidationError("limit", f"expected an integer from 1 to {MAX_PAGE_SIZE}")
    return int(text)


def _page(
    session: Session, account: Account, raw: dict[str, list[str]]
) -> tuple[OrderFilters, ReportPage]:
    filters = parse_filters(raw, ignore=PAGING_PARAMS)
    limit = parse_limit(raw.get("limit", []))
    page = fetch_page(session, account, filters, limit=limit, cursor=_last(raw, "cursor"))
    return filters, page


def _api_page(request: Request, slug: str, raw: dict[str, list[str]]) -> ReportPage:
    """The caller and the page in one session and one thread hop: the report API is the host
    app's hottest path (one pool checkout per request, not two)."""
    with api_state(request).sessions() as session:
        caller = require_caller(request, session)
        account, _ = account_for(session, slug, caller.user)
        return _page(session, account, raw)[1]


async def orders_api(request: Request) -> Response:
    raw = _raw_params(request)
    page = await run_in_threadpool(_api_page, request, request.path_params["slug"], raw)
    # wire.ReportPage is this body's schema; orjson writes it (a page of 1,000 rows is the
    # API's hottest path: validating every cell again would cost more than the query).
    body = {"columns": page.columns, "rows": page.rows, "next_cursor": page.next_cursor}
    return Response(orjson.dumps(body), media_type="application/json")


def _sort_query(pairs: list[tuple[str, str]], sort: str) -> str:
    return urlencode([(k, v) for k, v in pairs if k != "sort"] + [("sort", sort)])


def _page_query(pairs: list[tuple[str, str]], cursor: str | None) -> str:
    return urlencode(pairs + ([("cursor", cursor)] if cursor else []))


def _page_context(
    request: Request, session: Session, caller: Caller, slug: str, raw: dict[str, list[str]]
) -> tuple[dict[str, Any], int]:
    account, role = account_for(session, slug, caller.user)
    try:
        filters, page = _page(session, account, raw)
        error = None
    except ValidationError as exc:
        filters, page, error = OrderFilters(), None, exc
    context = {
        "account": account,
        "role": role.value,
        "user": caller.user,
        "filters": filters,
        "raw": raw,
        "columns": page.columns if page else column_headers(account.timezone),
        "rows": page.rows if page else [],
        "next_cursor": page.next_cursor if page else None,
        "next_query": filters.to_query()
        + ([("limit", limit)] if (limit := _last(raw, "limit")) else []),
        "sort_query": _sort_query,
        "page_query": _page_query,
        "numeric_keys": NUMERIC_KEYS,
        "error": error,
        "statuses": ORDER_STATUSES,
        "channels": ORDER_CHANNELS,
        "sorts": list(SORTS),
        "sort_labels": SORT_LABELS,
        "csrf": csrf_token(request),
    }
    # The export button and the Exports panel.
    context.update(exportviews.panel_context(request, session, caller, account, role, filters))
    return context, 422 if error else 200


def _orders_page(request: Request) -> Response:
    """The caller, the page and the Exports panel in one session."""

    def page(session: Session, caller: Caller) -> Response:
        slug, raw = request.path_params["slug"], _raw_params(request)
        context, status = _page_context(request, session, caller, slug, raw)
        return api_state(request).templates.TemplateResponse(
            request,
            "orders.html",
            context,
            status_code=status,
            headers={"Cache-Control": "no-store"},  # the Exports panel holds signed links
        )

    return for_caller(request, page)


async def orders_page(request: Request) -> Response:
    return await run_in_threadpool(_orders_page, request)


def _home(request: Request) -> Response:
    def page(session: Session, caller: Caller) -> Response:
        context = {
            "user": caller.user,
            "memberships": accounts_of(session, caller.user),
            "csrf": csrf_token(request),
        }
        return api_state(request).templates.TemplateResponse(request, "home.html", context)

    return for_caller(request, page)


async def home(request: Request) -> Response:
    return await run_in_threadpool(_home, request)
