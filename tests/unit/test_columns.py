"""The report's columns are the spec's, in the spec's order, with one formula guard."""

from __future__ import annotations

import pytest

from shared.columns import COLUMNS, Kind, guard_text


def test_columns_follow_the_spec() -> None:
    assert [c.key for c in COLUMNS] == [
        "number", "placed_at", "customer_name", "customer_email", "status", "channel",
        "items_count", "subtotal", "tax", "shipping", "total", "currency",
    ]  # fmt: skip
    labels = [c.label_for("Europe/Berlin") for c in COLUMNS]
    assert labels[:2] == ["Order", "Placed at (Europe/Berlin)"]
    assert labels[6:11] == ["Items", "Subtotal", "Tax", "Shipping", "Total"]
    numeric = {c.key for c in COLUMNS if c.kind is Kind.NUMBER}
    assert numeric == {"items_count", "subtotal", "tax", "shipping", "total"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=SUM(A1)", "'=SUM(A1)"),
        ("+44", "'+44"),
        ("-x", "'-x"),
        ("@me", "'@me"),
        ("\tTab", "'\tTab"),
        ("\rCR", "'\rCR"),
        ("plain", "plain"),
        ("a=b", "a=b"),
        ("", ""),
        # Hidden behind White_Space or format (Cf) characters a spreadsheet trims on import.
        (" =1+1", "' =1+1"),
        ("\u00a0+1", "'\u00a0+1"),
        ("\u3000-1", "'\u3000-1"),
        ("\u200b@x", "'\u200b@x"),
        ("\ufeff=1", "'\ufeff=1"),
        ("\u2060\u200d=1", "'\u2060\u200d=1"),
        ("\n=1", "'\n=1"),
        # Full-width triggers, alone or hidden.
        ("\uff1d1", "'\uff1d1"),
        ("\uff0b1", "'\uff0b1"),
        ("\uff0d1", "'\uff0d1"),
        ("\uff20x", "'\uff20x"),
        (" \uff1d1", "' \uff1d1"),
        # Only looks close.
        (" Anna", " Anna"),
        ("\u00a0Bob", "\u00a0Bob"),
        ("\u200b", "\u200b"),
        ("Łukasz", "Łukasz"),
    ],
)
def test_formula_guard(value: str, expected: str) -> None:
    assert guard_text(value) == expected
