"""Property-based tests of the filter parser: any input is either valid filters or a named
ValidationError, and valid filters survive every round trip (snapshot, query string)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from shared.errors import ValidationError
from shared.filters import (
    FILTER_NAMES,
    SORTS,
    OrderFilters,
    from_snapshot,
    parse_filter_object,
    parse_filters,
)
from shared.models import ORDER_CHANNELS, ORDER_STATUSES

names = st.one_of(st.sampled_from(FILTER_NAMES), st.text(max_size=12))
values = st.one_of(
    st.text(max_size=250),
    st.sampled_from(
        [
            *ORDER_STATUSES,
            *ORDER_CHANNELS,
            *SORTS,
            "2025-02-29",
            "2024-02-29",
            "1e999",
            "NaN",
            "-0",
            "Infinity",
        ]
    ),
    st.dates().map(dt.date.isoformat),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
)


@given(st.dictionaries(names, st.lists(values, max_size=3), max_size=6))
def test_any_query_is_valid_filters_or_a_named_error(raw: dict[str, list[str]]) -> None:
    try:
        filters = parse_filters(raw)
    except ValidationError as exc:
        assert exc.field, "the error names a field"
        assert (
            exc.field in FILTER_NAMES
            or any(name.startswith(exc.field) for name in raw)
            or not all(raw)
        )
        assert exc.message.startswith(exc.field)
    else:
        assert isinstance(filters, OrderFilters)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@given(st.one_of(json_values, st.dictionaries(names, json_values, max_size=5)))
def test_any_json_is_valid_filters_or_a_named_error(raw: object) -> None:
    try:
        parse_filter_object(raw)
    except ValidationError as exc:
        assert exc.field


totals = st.decimals(min_value=Decimal("-9999999999"), max_value=Decimal("9999999999"), places=2)


@st.composite
def valid_filters(draw: st.DrawFn) -> OrderFilters:
    start = draw(st.none() | st.dates(dt.date(2000, 1, 1), dt.date(2030, 12, 31)))
    end = draw(st.none() | st.dates(start or dt.date(2000, 1, 1), dt.date(2031, 12, 31)))
    low = draw(st.none() | totals)
    high = draw(st.none() | (totals.filter(lambda t: low is None or t >= low)))
    text = draw(
        st.none()
        | st.text(
            st.characters(min_codepoint=32, blacklist_categories=("Cs",)), min_size=1, max_size=200
        )
    )
    q = text.strip() or None if text else None
    return OrderFilters(
        status=tuple(
            s for s in ORDER_STATUSES if s in draw(st.sets(st.sampled_from(ORDER_STATUSES)))
        ),
        channel=tuple(
            c for c in ORDER_CHANNELS if c in draw(st.sets(st.sampled_from(ORDER_CHANNELS)))
        ),
        placed_from=start,
        placed_to=end,
        q=q if q is None or "\x7f" not in q else None,
        min_total=low,
        max_total=high,
        sort=draw(st.sampled_from(list(SORTS))),
    )


@given(valid_filters())
def test_valid_filters_survive_the_snapshot_and_the_query_string(filters: OrderFilters) -> None:
    assert from_snapshot(filters.to_snapshot()) == filters
    pairs: dict[str, list[str]] = {}
    for key, value in filters.to_query():
        pairs.setdefault(key, []).append(value)
    assert parse_filters(pairs) == filters


hostile_numbers = st.one_of(
    st.text(st.characters(whitelist_categories=("Nd", "No", "Nl")), min_size=1, max_size=12),
    st.builds(lambda m, e: f"{m}e{e}", st.integers(-(10**6), 10**6), st.integers(-(10**6), 10**6)),
    st.integers(-(10**60), 10**60).map(str),
    st.decimals(places=30).map(str),
    st.floats().map(repr),
)


@given(st.sampled_from(["min_total", "max_total"]), hostile_numbers)
def test_a_total_is_a_money_amount_or_a_named_error(name: str, text: str) -> None:
    try:
        filters = parse_filters({name: [text]})
    except ValidationError as exc:
        assert exc.field == name
    else:
        value = getattr(filters, name)
        assert value is None or (
            abs(value) < Decimal("1e10") and value == value.quantize(Decimal("0.01"))
        )
        assert text.strip().isascii()


@given(st.integers(1, 3000), st.sampled_from(["[", '{"a":']))
def test_deep_nesting_is_a_named_error(depth: int, opener: str) -> None:
    raw: object = 1
    for _ in range(depth):
        raw = [raw] if opener == "[" else {"a": raw}
    try:
        parse_filter_object({"filters": raw} if opener == "[" else raw)
    except ValidationError as exc:
        assert exc.field
