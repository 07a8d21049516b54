"""The report's ``q`` search and its trigram index, on a real PostgreSQL.

A bulk seed builds the index after the load; small loads insert into it as production does; the
planner uses it for a selective search; and searching through the index finds exactly the
orders a plain substring match over number, name and email finds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from shared.db import transaction
from shared.filters import OrderFilters
from shared.identity import ensure_account
from shared.models import ORDER_SEARCH_INDEX, ORDER_SEARCH_STATISTICS, Account, Order
from shared.report import explain, fetch_page, page_select
from shared.seeding import REBUILD_MIN_ORDERS, rebuilds_search_index, seed_orders
from tests.support.reports import search_statistics

SLUG = "search"
#: A bulk load big enough to rebuild the index (the table starts empty in this module).
BULK = REBUILD_MIN_ORDERS


def index_state(session: Session) -> tuple[bool, bool] | None:
    """(valid, ready) of the search index, or None when it does not exist."""
    row = session.execute(
        text(
            "SELECT i.indisvalid, i.indisready FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = :name"
        ),
        {"name": ORDER_SEARCH_INDEX},
    ).first()
    return None if row is None else (bool(row[0]), bool(row[1]))


@pytest.fixture(scope="module")
def account(sessions: sessionmaker[Session]) -> Iterator[Account]:
    with transaction(sessions) as session:
        found = ensure_account(session, slug=SLUG, name="Search", timezone="UTC")
        assert rebuilds_search_index(session, BULK)
        seed_orders(session, found, orders=BULK)
        session.expunge(found)
    yield found


def test_bulk_seed_leaves_a_valid_index_and_small_loads_keep_it(
    sessions: sessionmaker[Session], account: Account
) -> None:
    with transaction(sessions) as session:
        assert index_state(session) == (True, True)
        # A load smaller than the table inserts into the index in place.
        assert not rebuilds_search_index(session, 10)
        seed_orders(session, account, orders=10, seed=7)
    with sessions() as session:
        assert index_state(session) == (True, True)
        newest = session.scalar(
            select(Order.number)
            .where(Order.account_id == account.id)
            .order_by(Order.id.desc())
            .limit(1)
        )
        assert newest == f"A-{BULK + 10:06d}"
        # The order inserted with the index in place is found through it.
        page = fetch_page(session, account, OrderFilters(q=newest.lower()))
        assert [row["number"] for row in page.rows] == [newest]


def _plan_indexes(node: dict[str, Any]) -> set[str]:
    found = {node["Index Name"]} if "Index Name" in node else set()
    for child in node.get("Plans", []):
        found |= _plan_indexes(child)
    return found


def test_a_selective_search_uses_the_trigram_index(
    sessions: sessionmaker[Session], account: Account
) -> None:
    with sessions() as session:
        query = page_select(account, OrderFilters(q="A-01234"), limit=100)
        plan = explain(session, query, analyze=True)[0]
        assert ORDER_SEARCH_INDEX in _plan_indexes(plan["Plan"])
        assert plan["Plan"]["Actual Rows"] == 10  # A-012340 .. A-012349


def test_a_rebuilt_index_keeps_the_fine_histogram_of_the_search_document(
    sessions: sessionmaker[Session], account: Account
) -> None:
    # The bulk seed dropped the index and built it again, then ANALYZEd: the rebuilt index has
    # the statistics target again, so the histogram has a bound per 0.1 % of the rows (every
    # seeded document is distinct, and the 50k rows fit in the sample).
    with sessions() as session:
        assert search_statistics(session) == (ORDER_SEARCH_STATISTICS, ORDER_SEARCH_STATISTICS + 1)


@pytest.mark.parametrize(
    "q",
    ["a-0123", "LOVELACE", "customer4242@", "+orders", "Šimić", "o'brien", "example.test", "ZZZ"],
)
def test_search_finds_exactly_the_substring_matches(
    sessions: sessionmaker[Session], account: Account, q: str
) -> None:
    with sessions() as session:
        orders = session.execute(
            select(Order.number, Order.customer_name, Order.customer_email).where(
                Order.account_id == account.id
            )
        ).all()
        needle = q.lower()
        expected = sorted(
            number
            for number, name, email in orders
            if any(needle in field.lower() for field in (number, name, email))
        )
        found: list[str] = []
        cursor = None
        while True:
            page = fetch_page(
                session, account, OrderFilters(q=q, sort="number"), limit=1000, cursor=cursor
            )
            found.extend(row["number"] for row in page.rows)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert sorted(found) == expected
        if q != "ZZZ":
            assert expected
