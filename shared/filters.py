"""The orders report's filters: parsing, validation and the normalized snapshot.

The report page, the report API and the export request all go through this module, so an export
runs with exactly the filters the report applied. Nothing reaches SQL without passing here.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from shared.errors import ValidationError
from shared.models import ORDER_CHANNELS, ORDER_STATUSES

#: Longest accepted free-text search (characters).
MAX_Q_LENGTH = 200
#: Largest absolute total accepted by min_total / max_total (numeric(12,2) holds less).
MAX_TOTAL = Decimal("10000000000")
#: Longest unknown parameter name repeated in an error (characters).
MAX_SHOWN_NAME = 40
#: Sort used when none is given.
DEFAULT_SORT = "-placed_at"
#: The sorts of the report: name -> (order column, descending?). Ties break on order id.
SORTS: dict[str, tuple[str, bool]] = {
    "-placed_at": ("placed_at", True),
    "placed_at": ("placed_at", False),
    "-total": ("total", True),
    "total": ("total", False),
    "number": ("number", False),
    "-number": ("number", True),
}
#: Words for each sort (menus, export pages).
SORT_LABELS: dict[str, str] = {
    "-placed_at": "newest first",
    "placed_at": "oldest first",
    "-total": "highest total first",
    "total": "lowest total first",
    "number": "order number",
    "-number": "order number, descending",
}

FILTER_NAMES = (
    "status",
    "channel",
    "placed_from",
    "placed_to",
    "q",
    "min_total",
    "max_total",
    "sort",
)
_REPEATABLE = ("status", "channel")


@dataclass(frozen=True)
class OrderFilters:
    """A validated, normalized set of report filters (hashable, comparable)."""

    status: tuple[str, ...] = ()
    channel: tuple[str, ...] = ()
    placed_from: dt.date | None = None
    placed_to: dt.date | None = None
    q: str | None = None
    min_total: Decimal | None = None
    max_total: Decimal | None = None
    sort: str = DEFAULT_SORT

    def to_snapshot(self) -> dict[str, Any]:
        """The JSON form stored with an export and returned by the API (every key present)."""
        return {
            "status": list(self.status),
            "channel": list(self.channel),
            "placed_from": self.placed_from.isoformat() if self.placed_from else None,
            "placed_to": self.placed_to.isoformat() if self.placed_to else None,
            "q": self.q,
            "min_total": _decimal_text(self.min_total),
            "max_total": _decimal_text(self.max_total),
            "sort": self.sort,
        }

    def to_query(self) -> list[tuple[str, str]]:
        """Query-string pairs that parse back to these filters (links, forms, emails)."""
        pairs: list[tuple[str, str]] = []
        for name, value in self.to_snapshot().items():
            if isinstance(value, list):
                pairs.extend((name, item) for item in value)
            elif value is not None and not (name == "sort" and value == DEFAULT_SORT):
                pairs.append((name, value))
        return pairs

    def summary(self) -> str:
        """A one-line human description, e.g. for the email."""
        parts = []
        if self.status:
            parts.append("status " + ", ".join(self.status))
        if self.channel:
            parts.append("channel " + ", ".join(self.channel))
        if self.placed_from or self.placed_to:
            start = self.placed_from.isoformat() if self.placed_from else "…"
            end = self.placed_to.isoformat() if self.placed_to else "…"
            parts.append(f"placed {start} to {end}")
        if self.q:
            parts.append(f'matching "{self.q}"')
        if self.min_total is not None:
            parts.append(f"total ≥ {_decimal_text(self.min_total)}")
        if self.max_total is not None:
            parts.append(f"total ≤ {_decimal_text(self.max_total)}")
        return "; ".join(parts) if parts else "all orders"


def _decimal_text(value: Decimal | None) -> str | None:
    if value is None:
        return None
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _choices(name: str, values: Sequence[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    chosen = set()
    for value in values:
        if value not in allowed:
            raise ValidationError(
                name, f"unknown value {value[:40]!r}; expected one of {', '.join(allowed)}"
            )
        chosen.add(value)
    return tuple(v for v in allowed if v in chosen)


def _date(name: str, value: str) -> dt.date:
    try:
        if len(value) != 10:
            raise ValueError
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ValidationError(name, "expected a date as YYYY-MM-DD") from None


#: A money amount as the filters accept it: ASCII digits, optional sign and decimal point.
_MONEY = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)
#: Longest money text looked at (characters); leading/trailing zeros beyond it are refused.
MAX_MONEY_TEXT = 40
#: Decimal places a total can have (numeric(12,2)).
MONEY_PLACES = 2


def parse_money(name: str, value: str) -> Decimal:
    """A total as numeric(12,2) can hold it: plain ASCII decimal notation (no exponent), at most
    10 integer digits and 2 decimals (trailing zeros aside); else a ValidationError naming
    ``name``."""
    text = value.strip()
    if len(text) > MAX_MONEY_TEXT or not _MONEY.fullmatch(text):
        raise ValidationError(name, "expected a decimal number such as 125.50")
    number = Decimal(text)
    if abs(number) >= MAX_TOTAL:
        raise ValidationError(name, "expected a finite decimal below 10,000,000,000")
    _, _, decimals = text.partition(".")
    if len(decimals.rstrip("0")) > MONEY_PLACES:
        raise ValidationError(name, f"at most {MONEY_PLACES} decimal places")
    return number


def _total(name: str, value: str) -> Decimal:
    return parse_money(name, value)


def _q(value: str) -> str | None:
    if len(value) > MAX_Q_LENGTH:
        raise ValidationError("q", f"at most {MAX_Q_LENGTH} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValidationError("q", "control characters are not allowed")
    value = value.strip()
    return value or None


def _single(name: str, values: Sequence[str]) -> str | None:
    if len(values) > 1:
        raise ValidationError(name, "given more than once")
    value = values[0] if values else ""
    return value if value != "" else None


def _shown_name(name: str) -> str:
    """An unknown parameter name as an error may repeat it: short, and never empty."""
    return name[:MAX_SHOWN_NAME] or "(empty name)"


def parse_filters(raw: Mapping[str, Sequence[str]], *, ignore: Iterable[str] = ()) -> OrderFilters:
    """Validate filters given as name -> list of strings (a query string or a form).

    Empty values mean "no filter". Unknown names are refused unless listed in ``ignore``
    (e.g. the report's own ``limit`` and ``cursor``).
    """
    skipped = set(ignore)
    for name in raw:
        if name not in FILTER_NAMES and name not in skipped:
            raise ValidationError(_shown_name(name), "unknown filter")

    def values(name: str) -> list[str]:
        return [v for v in raw.get(name, ()) if not (name in _REPEATABLE and v == "")]

    filters = OrderFilters(
        status=_choices("status", values("status"), ORDER_STATUSES),
        channel=_choices("channel", values("channel"), ORDER_CHANNELS),
    )
    if (text := _single("placed_from", values("placed_from"))) is not None:
        filters = replace(filters, placed_from=_date("placed_from", text))
    if (text := _single("placed_to", values("placed_to"))) is not None:
        filters = replace(filters, placed_to=_date("placed_to", text))
    if (text := _single("q", values("q"))) is not None:
        filters = replace(filters, q=_q(text))
    if (text := _single("min_total", values("min_total"))) is not None:
        filters = replace(filters, min_total=_total("min_total", text))
    if (text := _single("max_total", values("max_total"))) is not None:
        filters = replace(filters, max_total=_total("max_total", text))
    if (text := _single("sort", values("sort"))) is not None:
        if text not in SORTS:
            raise ValidationError("sort", f"expected one of {', '.join(SORTS)}")
        filters = replace(filters, sort=text)

    if filters.placed_from and filters.placed_to and filters.placed_from > filters.placed_to:
        raise ValidationError("placed_from", "must not be after placed_to")
    if (
        filters.min_total is not None
        and filters.max_total is not None
        and filters.min_total > filters.max_total
    ):
        raise ValidationError("min_total", "must not be greater than max_total")
    return filters


def _is_scalar(name: str, value: object) -> bool:
    if isinstance(value, str):
        return True
    # JSON numbers are welcome for the totals only (bool is an int in Python: refuse it).
    numeric = isinstance(value, int | float | Decimal) and not isinstance(value, bool)
    return numeric and name in ("min_total", "max_total")


def parse_filter_object(raw: object) -> OrderFilters:
    """Validate filters given as a JSON object (the export request body).

    ``status`` and ``channel`` are lists of strings; the rest are strings, numbers or null.
    """
    if raw is None:
        return OrderFilters()
    if not isinstance(raw, dict):
        raise ValidationError("filters", "expected a JSON object")
    lists: dict[str, list[str]] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or name not in FILTER_NAMES:
            raise ValidationError(_shown_name(str(name)), "unknown filter")
        if value is None:
            lists[name] = []
        elif name in _REPEATABLE:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValidationError(name, "expected a list of strings")
            lists[name] = value
        elif not _is_scalar(name, value):
            raise ValidationError(name, "expected a string")
        else:
            lists[name] = [str(value)]
    return parse_filters(lists)


def from_snapshot(snapshot: Mapping[str, Any]) -> OrderFilters:
    """Rebuild filters from :meth:`OrderFilters.to_snapshot` output (stored exports)."""
    return parse_filter_object(dict(snapshot))
