"""The orders report read page by page through the JSON API, and what an export of it holds.

The formula guard here is an independent copy of the product's rule (the triggers and what a
spreadsheet trims), applied to the columns the product itself calls text (``shared.columns``).
"""

from __future__ import annotations

import unicodedata
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.orm import Session

from shared.columns import COLUMNS, Kind
from shared.models import ORDER_SEARCH_INDEX

#: Formula triggers, full-width forms included; an independent copy of the product's rule.
TRIGGERS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")
#: Positions of the columns that hold text (the guard applies to them only).
TEXT_POSITIONS = frozenset(i for i, column in enumerate(COLUMNS) if column.kind is Kind.TEXT)
#: Rows per page asked for while paging.
PAGE = 1000


class _Client(Protocol):
    def get(self, url: str, *, params: Any = ..., headers: Any = ...) -> Any: ...


def report_rows(
    client: _Client,
    filters: dict[str, Any],
    *,
    slug: str = "acme",
    headers: dict[str, str] | None = None,
) -> list[list[str]]:
    """The header row and every row of the report with ``filters``, following the cursors."""
    header: list[str] = []
    rows: list[list[str]] = []
    cursor = None
    while True:
        params = {**filters, "limit": PAGE, **({"cursor": cursor} if cursor else {})}
        body = client.get(
            f"/api/v1/accounts/{slug}/orders", params=params, headers=headers or {}
        ).json()
        header = [c["label"] for c in body["columns"]]
        rows.extend([row[c["key"]] for c in body["columns"]] for row in body["rows"])
        cursor = body["next_cursor"]
        if cursor is None:
            return [header, *rows]


def first_visible(value: str) -> str:
    """The first character after Unicode White_Space (Zs, Zl, Zp, TAB..CR, NEL) and format
    (Cf) characters, which a spreadsheet may trim on import."""
    for ch in value:
        hidden = unicodedata.category(ch) in ("Zs", "Zl", "Zp", "Cf") or ch in "\t\n\x0b\x0c\r\x85"
        if not hidden:
            return ch
    return ""


def guarded_value(value: str) -> str:
    """A text cell as the export writes it: prefixed with ``'`` when it would run as a formula."""
    return "'" + value if value[:1] in TRIGGERS or first_visible(value) in TRIGGERS else value


def guarded(row: list[str]) -> list[str]:
    """A report row as the export writes it (the guard on the text columns only)."""
    return [guarded_value(v) if i in TEXT_POSITIONS else v for i, v in enumerate(row)]


def search_statistics(session: Session) -> tuple[int | None, int | None]:
    """(statistics target, histogram bounds ANALYZE kept) of the ``q`` search's expression."""
    target = session.scalar(
        text(
            "SELECT attstattarget FROM pg_attribute"
            " WHERE attrelid = CAST(:index AS regclass) AND attnum = 1"
        ),
        {"index": ORDER_SEARCH_INDEX},
    )
    bounds = session.scalar(
        text(
            "SELECT cardinality(CAST(CAST(histogram_bounds AS text) AS text[])) FROM pg_stats"
            " WHERE tablename = :index"
        ),
        {"index": ORDER_SEARCH_INDEX},
    )
    return target, bounds
