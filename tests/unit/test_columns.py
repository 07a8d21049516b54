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
    ],
)
def test_formula_guard(value: str, expected: str) -> None:
    assert guard_text(value) == expected
