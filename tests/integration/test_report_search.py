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
from shared.models import (
    ORDER_EMAIL_INDEX,
    ORDER_SEARCH_INDEX,
    ORDER_SEARCH_STATISTICS,
    Account,
    Order,
)
from shared.report import (
    SearchTerms,
    explain,
    fetch_page,
    page_select,
    search_terms,
    search_terms_select,
)
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
    [
        "a-0123",
        "LOVELACE",
        "customer4242@",
        "customer777",
        "+orders",
        "Šimić",
        "o'brien",
        "example.test",
        "42",
        "ZZZ",
    ],
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


def test_an_email_search_reads_the_email_index_not_the_search_document(
    sessions: sessionmaker[Session], account: Account
) -> None:
    # Every seeded email shares "customer…@example.test": through the search document's trigram
    # index an email search walks posting lists of every order (0.2-0.7 s at 5M orders). The
    # report finds the few matching emails among the account's distinct ones and reads the
    # email index for those.
    with sessions() as session:
        filters = OrderFilters(q="customer4242@")
        terms = search_terms(session, account, filters.q)
        assert terms is not None and terms.emails and not terms.names
        assert all("customer4242@" in email.lower() for email in terms.emails)
        plan = explain(session, page_select(account, filters, limit=100, terms=terms))[0]
        used = _plan_indexes(plan["Plan"])
        assert ORDER_EMAIL_INDEX in used
        assert ORDER_SEARCH_INDEX not in used


def test_a_search_matching_many_customers_falls_back_to_the_search_document(
    sessions: sessionmaker[Session], account: Account
) -> None:
    with sessions() as session:
        assert search_terms(session, account, "example.test") is None  # every email matches
        assert search_terms(session, account, "zzz-no-such-customer") == SearchTerms((), ())


def _insert_order(session: Session, account: Account, number: str, name: str, email: str) -> None:
    session.execute(
        text(
            "INSERT INTO orders (account_id, number, placed_at, customer_name, customer_email,"
            " status, channel, items_count, subtotal, tax, shipping, total, currency)"
            " VALUES (:account, :number, now(), :name, :email, 'paid', 'web', 1, 10, 2, 0, 12,"
            " 'EUR')"
        ),
        {"account": account.id, "number": number, "name": name, "email": email},
    )


def _numbers(session: Session, account: Account, q: str) -> list[str]:
    page = fetch_page(session, account, OrderFilters(q=q, sort="number"), limit=1000)
    return [row["number"] for row in page.rows]


def test_new_and_changed_customers_are_found_at_once_and_deleted_ones_match_nothing(
    sessions: sessionmaker[Session], account: Account
) -> None:
    # The distinct names and emails follow every INSERT and UPDATE of orders (a trigger in the
    # same transaction), however the host application writes them.
    with transaction(sessions) as session:
        _insert_order(session, account, "T-1", "Zebulon Quist", "zq.first@shop.test")
    with sessions() as session:
        assert _numbers(session, account, "zebulon quist") == ["T-1"]
        assert _numbers(session, account, "ZQ.FIRST@") == ["T-1"]
    with transaction(sessions) as session:
        session.execute(
            text(
                "UPDATE orders SET customer_email = 'zq.second@shop.test', customer_name ="
                " 'Zebulon Quist-Vance' WHERE account_id = :account AND number = 'T-1'"
            ),
            {"account": account.id},
        )
    with sessions() as session:
        assert _numbers(session, account, "zq.second@") == ["T-1"]
        assert _numbers(session, account, "quist-vance") == ["T-1"]
        assert _numbers(session, account, "zq.first@") == []  # the old email is kept, unused
    with transaction(sessions) as session:
        session.execute(
            text("DELETE FROM orders WHERE account_id = :account AND number = 'T-1'"),
            {"account": account.id},
        )
    with sessions() as session:
        assert _numbers(session, account, "zq.second@") == []
        assert _numbers(session, account, "zebulon") == []


def test_a_bulk_seed_leaves_fresh_statistics_of_the_distinct_customers(
    sessions: sessionmaker[Session], account: Account
) -> None:
    # With the statistics of the empty table (the migration's ANALYZE), the planner takes the
    # account's tens of thousands of terms for a few hundred and filters them all by the search
    # (25 ms at 500k orders, 140-300 ms under load at 5M) instead of reading the trigram index.
    with sessions() as session:
        counted = session.scalar(text("SELECT count(*) FROM order_search_terms"))
        estimated = session.scalar(
            text("SELECT reltuples FROM pg_class WHERE oid = 'order_search_terms'::regclass")
        )
        assert counted and estimated is not None
        assert abs(estimated - counted) <= counted * 0.1
        plan = explain(session, search_terms_select(account, "a-0499"), analyze=True)[0]
        assert "order_search_terms_trgm_idx" in _plan_indexes(plan["Plan"])
