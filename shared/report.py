"""The orders report query: filters -> SQL, keyset pagination, and the export's SELECT."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    ColumnElement,
    Select,
    bindparam,
    func,
    literal_column,
    or_,
    select,
    tuple_,
)
from sqlalchemy.orm import Session

from shared.columns import COLUMNS, display_columns
from shared.errors import ValidationError
from shared.filters import SORTS, OrderFilters, parse_money
from shared.models import ORDER_SEARCH_DOCUMENT_SQL, Account, Order, OrderSearchTerm

#: Rows per report page unless the caller asks otherwise.
DEFAULT_PAGE_SIZE = 100
#: Largest page the report API serves.
MAX_PAGE_SIZE = 1000
#: Largest value of a bigint column (order ids in cursors).
MAX_BIGINT = 2**63 - 1
#: Most distinct names plus emails a ``q`` search reads through their B-tree indexes; a search
#: matching more customers (``example.test``) matches so many orders that walking the sort's
#: index and testing the search document finds a page at once.
MAX_SEARCH_TERMS = 256


@dataclass(frozen=True)
class ReportPage:
    """One page of the report: column headers, display rows and the cursor of the next page."""

    columns: list[dict[str, str]]
    rows: list[dict[str, str]]
    next_cursor: str | None


def column_headers(timezone: str) -> list[dict[str, str]]:
    return [{"key": c.key, "label": c.label_for(timezone)} for c in COLUMNS]


def _local_midnight(day: dt.date, timezone: str) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=ZoneInfo(timezone))


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True)
class SearchTerms:
    """The customer names and emails of an account that contain a ``q`` search (sorted)."""

    names: tuple[str, ...]
    emails: tuple[str, ...]


def _search_pattern(q: str) -> str:
    return "%" + _like_escape(q.lower()) + "%"


def search_terms_select(account: Account, q: str) -> Select[str, str]:
    """(kind, value) of the terms of ``account`` containing ``q``, at most one over the limit."""
    return (
        select(OrderSearchTerm.kind, OrderSearchTerm.value)
        .where(
            OrderSearchTerm.account_id == account.id,
            func.lower(OrderSearchTerm.value).like(_search_pattern(q), escape="\\"),
        )
        .limit(MAX_SEARCH_TERMS + 1)
    )


def search_terms(session: Session, account: Account, q: str | None) -> SearchTerms | None:
    """The names and emails of ``account`` containing ``q``, case-insensitively (trigram index
    over the distinct ones); None without ``q`` or when more than :data:`MAX_SEARCH_TERMS`
    match (the conditions then test the search document instead)."""
    if not q:
        return None
    rows = session.execute(search_terms_select(account, q)).all()
    if len(rows) > MAX_SEARCH_TERMS:
        return None
    names = tuple(sorted(value for kind, value in rows if kind == "name"))
    emails = tuple(sorted(value for kind, value in rows if kind == "email"))
    return SearchTerms(names=names, emails=emails)


def _search_condition(filters: OrderFilters, terms: SearchTerms | None) -> ColumnElement[bool]:
    """``q`` as a substring of the number, the customer's name or email (case-insensitive).

    With ``terms`` (:func:`search_terms` of the same ``q``): the number's trigram index or the
    orders of those customers; the arrays are literal values, so the planner estimates them
    from the columns' statistics like any ``IN`` list. Without: the search document (its
    trigram index, or a filter on the sort's index walk when many orders match).
    """
    assert filters.q
    pattern = _search_pattern(filters.q)
    if terms is None:
        document: ColumnElement[str] = literal_column(ORDER_SEARCH_DOCUMENT_SQL)
        return document.like(pattern, escape="\\")
    alternatives = [func.lower(Order.number).like(pattern, escape="\\")]
    if terms.names:
        alternatives.append(Order.customer_name.in_(terms.names))
    if terms.emails:
        alternatives.append(Order.customer_email.in_(terms.emails))
    return or_(*alternatives)


def filter_conditions(
    account: Account, filters: OrderFilters, terms: SearchTerms | None = None
) -> list[ColumnElement[bool]]:
    """WHERE conditions of the report for one account (always scoped to that account).

    ``terms``: :func:`search_terms` of ``filters.q``, looked up once per request (without, a
    ``q`` search tests the search document, as the export's COPY does).
    """
    conditions: list[ColumnElement[bool]] = [Order.account_id == account.id]
    if filters.status:
        conditions.append(Order.status.in_(filters.status))
    if filters.channel:
        conditions.append(Order.channel.in_(filters.channel))
    if filters.placed_from:
        conditions.append(Order.placed_at >= _local_midnight(filters.placed_from, account.timezone))
    if filters.placed_to:
        next_day = filters.placed_to + dt.timedelta(days=1)
        conditions.append(Order.placed_at < _local_midnight(next_day, account.timezone))
    if filters.q:
        conditions.append(_search_condition(filters, terms))
    if filters.min_total is not None:
        conditions.append(Order.total >= filters.min_total)
    if filters.max_total is not None:
        conditions.append(Order.total <= filters.max_total)
    return conditions


def _sort_key(filters: OrderFilters) -> tuple[Any, bool]:
    name, descending = SORTS[filters.sort]
    return getattr(Order, name), descending


def _order_by(filters: OrderFilters) -> list[ColumnElement[Any]]:
    column, descending = _sort_key(filters)
    if descending:
        return [column.desc(), Order.id.desc()]
    return [column.asc(), Order.id.asc()]


def report_select(
    account: Account,
    filters: OrderFilters,
    *,
    guard_formulas: bool,
    terms: SearchTerms | None = None,
) -> Select[*tuple[Any, ...]]:
    """The report's rows as display strings, in report order (the export's COPY source)."""
    timezone: ColumnElement[str] = bindparam("account_timezone", account.timezone)
    query: Select[*tuple[Any, ...]] = (
        select(*display_columns(timezone, guard_formulas=guard_formulas))
        .where(*filter_conditions(account, filters, terms))
        .order_by(*_order_by(filters))
    )
    return query


def _encode_cursor(sort: str, value: Any, order_id: int) -> str:
    if isinstance(value, dt.datetime):
        value = value.isoformat()
    elif isinstance(value, Decimal):
        value = str(value)
    raw = json.dumps([sort, value, order_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, filters: OrderFilters) -> tuple[Any, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        sort, value, order_id = json.loads(raw)
        if sort != filters.sort or not isinstance(order_id, int) or not isinstance(value, str):
            raise ValueError
        if isinstance(order_id, bool) or not 0 <= order_id <= MAX_BIGINT or "\x00" in value:
            raise ValueError
        name, _ = SORTS[sort]
        typed: Any
        if name == "placed_at":
            typed = dt.datetime.fromisoformat(value)
            if typed.tzinfo is None:
                raise ValueError
        elif name == "total":
            typed = parse_money("cursor", value)
        else:
            typed = value
    except (
        ValueError,
        TypeError,
        binascii.Error,
        UnicodeDecodeError,
        RecursionError,
        ValidationError,
    ):
        raise ValidationError("cursor", "invalid or stale cursor; start again without it") from None
    return typed, order_id


def page_select(
    account: Account,
    filters: OrderFilters,
    *,
    limit: int,
    cursor: str | None = None,
    terms: SearchTerms | None = None,
) -> Select[*tuple[Any, ...]]:
    """The query of one report page: ``limit + 1`` rows (the extra one tells a next page)."""
    sort_column, descending = _sort_key(filters)
    query = report_select(account, filters, guard_formulas=False, terms=terms).add_columns(
        sort_column.label("_sort_value"), Order.id.label("_order_id")
    )
    if cursor:
        value, order_id = _decode_cursor(cursor, filters)
        position = tuple_(sort_column, Order.id)
        boundary = tuple_(bindparam("cursor_value", value, type_=sort_column.type), order_id)
        query = query.where(position < boundary if descending else position > boundary)
    return query.limit(limit + 1)


def fetch_page(
    session: Session,
    account: Account,
    filters: OrderFilters,
    *,
    limit: int = DEFAULT_PAGE_SIZE,
    cursor: str | None = None,
) -> ReportPage:
    """One page of the report, walking the sort's index from ``cursor`` (keyset pagination)."""
    terms = search_terms(session, account, filters.q)
    query = page_select(account, filters, limit=limit, cursor=cursor, terms=terms)
    result = session.execute(query).mappings().all()
    keys = [c.key for c in COLUMNS]
    rows = [{key: row[key] for key in keys} for row in result[:limit]]
    next_cursor = None
    if len(result) > limit:
        last = result[limit - 1]
        next_cursor = _encode_cursor(filters.sort, last["_sort_value"], last["_order_id"])
    return ReportPage(column_headers(account.timezone), rows, next_cursor)


def count_select(
    account: Account, filters: OrderFilters, *, bound: int, terms: SearchTerms | None = None
) -> Select[int]:
    """Matching rows, counting no further than ``bound`` (never a full scan of a big account)."""
    conditions = filter_conditions(account, filters, terms)
    inner = select(Order.id).where(*conditions).limit(bound).subquery()
    return select(func.count()).select_from(inner)


def count_rows(session: Session, account: Account, filters: OrderFilters, *, bound: int) -> int:
    terms = search_terms(session, account, filters.q)
    query = count_select(account, filters, bound=bound, terms=terms)
    return int(session.execute(query).scalar_one())


def explain(session: Session, query: Select[Any], *, analyze: bool = False) -> Any:
    """PostgreSQL's plan of ``query`` as JSON (with ``analyze``: run, with timings and buffers)."""
    compiled = query.compile(session.get_bind(), compile_kwargs={"render_postcompile": True})
    options = "ANALYZE, BUFFERS, FORMAT JSON" if analyze else "FORMAT JSON"
    result = session.connection().exec_driver_sql(
        f"EXPLAIN ({options}) {compiled}", compiled.params
    )
    return result.scalar_one()


#: An estimate more than this many times a count's bound settles "more than the bound" without
#: counting (filters without a text search only: their estimates come from the column
#: statistics; a ``q`` search's estimate is rough, so it is always counted).
ESTIMATE_MARGIN = 4


@dataclass(frozen=True)
class Size:
    """A filter set's rows as far as a bounded count tells them."""

    #: Exact up to the bound; ``bound + 1`` means "more".
    rows: int
    #: The planner's estimate, when it was asked (always when ``rows`` is more than the bound).
    estimate: int | None


def size_of(
    filters: OrderFilters,
    *,
    bound: int,
    estimate: Callable[[], int],
    count: Callable[[int], int],
) -> Size:
    """The planner first, the bounded count only where the estimate cannot settle it.

    The one rule of the export request (its lane and row cap) and of the worker (its progress
    total), each with its own connection: ``estimate()`` is the planner's row estimate, and
    ``count(n)`` counts at most ``n`` rows. An estimate above ``ESTIMATE_MARGIN`` times the
    bound settles "more" with no rows read (10-20 ms at 500k rows); a ``q`` search is always
    counted. When the count says "more", the planner is asked too if it was not yet."""
    planned = None if filters.q else estimate()
    if planned is not None and planned > ESTIMATE_MARGIN * bound:
        return Size(rows=bound + 1, estimate=planned)
    rows = count(bound + 1)
    if rows > bound and planned is None:
        planned = estimate()
    return Size(rows=rows, estimate=planned)


def estimate_rows(session: Session, account: Account, filters: OrderFilters) -> int:
    """The planner's row estimate for the report query (no rows are read)."""
    plan = explain(session, select(Order.id).where(*filter_conditions(account, filters)))
    return int(plan[0]["Plan"]["Plan Rows"])
