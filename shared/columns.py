"""The orders report's columns: defined once, used by the HTML table, the JSON API and the CSV.

Each column carries its SQL *display expression*: PostgreSQL renders the display string, so the
three outputs cannot drift apart and the CSV export can be one ``COPY (SELECT ...)``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Table, Text, case, cast, func, literal

from shared.models import Order


class Kind(enum.Enum):
    """How a column's display value is made; only TEXT values get the CSV formula guard."""

    TEXT = "text"
    NUMBER = "number"
    TIMESTAMP = "timestamp"


#: Characters that make a spreadsheet read a cell as a formula (CSV formula-injection guard),
#: the full-width forms included (some spreadsheets fold them to ASCII).
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")

#: Unicode White_Space (a stable property) and ranges of category Cf (format characters,
#: Unicode 14): a spreadsheet that trims these on import would still see the trigger after them.
_WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_FORMAT_RANGES = (
    (0x00AD, 0x00AD), (0x0600, 0x0605), (0x061C, 0x061C), (0x06DD, 0x06DD), (0x070F, 0x070F),
    (0x0890, 0x0891), (0x08E2, 0x08E2), (0x180E, 0x180E), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x2064), (0x2066, 0x206F), (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB), (0x110BD, 0x110BD),
    (0x110CD, 0x110CD), (0x13430, 0x13438), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001), (0xE0020, 0xE007F),
)  # fmt: skip
#: What may hide a trigger: skipped before looking at the first visible character.
INVISIBLE_PREFIX = _WHITE_SPACE + "".join(
    chr(code) for start, end in _FORMAT_RANGES for code in range(start, end + 1)
)

Expression = Callable[[Table, ColumnElement[str]], ColumnElement[str]]


@dataclass(frozen=True)
class Column:
    """One report column: stable key, human label, and the SQL that renders its display value."""

    key: str
    label: str
    kind: Kind
    display: Expression
    #: A CHECK constraint keeps every value of this text column away from the formula
    #: triggers, so the CSV guard can skip it (e.g. status, channel, ISO currency codes).
    formula_safe: bool = False

    def label_for(self, timezone: str) -> str:
        return self.label.format(timezone=timezone)


def _as_text(name: str) -> Expression:
    return lambda orders, _tz: cast(orders.c[name], Text)


def _local_minute(orders: Table, tz: ColumnElement[str]) -> ColumnElement[str]:
    return func.to_char(func.timezone(tz, orders.c.placed_at), "YYYY-MM-DD HH24:MI")


COLUMNS: tuple[Column, ...] = (
    Column("number", "Order", Kind.TEXT, _as_text("number")),
    Column("placed_at", "Placed at ({timezone})", Kind.TIMESTAMP, _local_minute),
    Column("customer_name", "Customer", Kind.TEXT, _as_text("customer_name")),
    Column("customer_email", "Email", Kind.TEXT, _as_text("customer_email")),
    Column("status", "Status", Kind.TEXT, _as_text("status"), formula_safe=True),
    Column("channel", "Channel", Kind.TEXT, _as_text("channel"), formula_safe=True),
    Column("items_count", "Items", Kind.NUMBER, _as_text("items_count")),
    # numeric(12,2)::text is a plain decimal with 2 places, '.' separator, no grouping.
    Column("subtotal", "Subtotal", Kind.NUMBER, _as_text("subtotal")),
    Column("tax", "Tax", Kind.NUMBER, _as_text("tax")),
    Column("shipping", "Shipping", Kind.NUMBER, _as_text("shipping")),
    Column("total", "Total", Kind.NUMBER, _as_text("total")),
    Column("currency", "Currency", Kind.TEXT, _as_text("currency"), formula_safe=True),
)

#: Bumped whenever COLUMNS changes; stored in each export's snapshot.
COLUMN_SET_VERSION = 1


def formula_guarded(value: ColumnElement[str]) -> ColumnElement[str]:
    """Prefix ``'`` to a text value that a spreadsheet would run as a formula: its first
    character, or its first after :data:`INVISIBLE_PREFIX` characters, is a trigger.

    ``ascii()`` of the first character is an integer compare per row; ``left(value, 1)`` would
    build a new string per cell (measured: a third of the whole COPY on 500k rows). Values that
    start with a printable ASCII character (nearly all) never reach the ``ltrim``.
    """
    triggers = [ord(ch) for ch in FORMULA_TRIGGERS]
    guarded = literal("'") + value
    first = func.ascii(value)
    return case(
        (first.in_(triggers), guarded),
        (first.between(33, 126), value),
        (func.ascii(func.ltrim(value, literal(INVISIBLE_PREFIX))).in_(triggers), guarded),
        else_=value,
    )


def guard_text(value: str) -> str:
    """The Python twin of :func:`formula_guarded`, for values rendered outside PostgreSQL."""
    if value[:1] in FORMULA_TRIGGERS or value.lstrip(INVISIBLE_PREFIX)[:1] in FORMULA_TRIGGERS:
        return "'" + value
    return value


def display_columns(
    timezone: ColumnElement[str], *, guard_formulas: bool
) -> list[ColumnElement[str]]:
    """The SELECT list of the report, each expression labelled with its column key."""
    table = Order.__table__
    assert isinstance(table, Table)
    selected: list[ColumnElement[str]] = []
    for column in COLUMNS:
        value = column.display(table, timezone)
        if guard_formulas and column.kind is Kind.TEXT and not column.formula_safe:
            value = formula_guarded(value)
        selected.append(value.label(column.key))
    return selected
