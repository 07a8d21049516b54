"""How an export request sizes itself (shared/exports.py), and the worker its progress total
(shared/csvfile.py): the planner's estimate first, the bounded count only where the estimate
cannot settle it.

Against a real PostgreSQL: the statements a request sends are recorded from the engine (the
worker's, from its connection), so the tests see whether the bounded count ran, and the lane
and inline decision it led to.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import psycopg
import pytest
from psycopg_pool import ConnectionPool
from sqlalchemy import event, select, text
from sqlalchemy.orm import Session, sessionmaker

from shared.csvfile import ExportQuery
from shared.db import transaction
from shared.exports import Requested, request_export
from shared.filters import OrderFilters
from shared.flags import FlagCache
from shared.identity import ensure_account, set_membership, upsert_user
from shared.lanes import FAST, NORMAL
from shared.models import Account, OutboxMessage, Role, User
from shared.seeding import seed_orders
from shared.settings import Settings

#: Orders of the big account: far above the count budget of the settings below.
BIG_ORDERS = 3000
#: Orders of the small account: within the fast lane of the settings below.
SMALL_ORDERS = 40
#: The count budget of these tests (fast-lane bound; the inline bound is lower).
FAST_LANE_MAX_ROWS = 100


@pytest.fixture(scope="module")
def user_id(sessions: sessionmaker[Session]) -> int:
    with transaction(sessions) as session:
        user = upsert_user(session, email="sizes@example.test", password="long-enough-pw")
        for slug, orders, seed in (("sized-big", BIG_ORDERS, 7), ("sized-small", SMALL_ORDERS, 8)):
            account = ensure_account(session, slug=slug, timezone="UTC")
            set_membership(session, account=account, user=user, role=Role.ADMIN)
            seed_orders(session, account, orders=orders, seed=seed)
        user_id = user.id
    with transaction(sessions) as session:
        session.execute(text("ANALYZE orders"))  # the planner knows the accounts' sizes
    return user_id


@pytest.fixture()
def statements(sessions: sessionmaker[Session]) -> Iterator[list[str]]:
    """The SQL of every statement sent while the test runs."""
    engine = sessions.kw["bind"]
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    yield sent
    event.remove(engine, "before_cursor_execute", record)


def request(
    settings: Settings,
    sessions: sessionmaker[Session],
    user_id: int,
    slug: str,
    filters: dict[str, object],
) -> tuple[Requested, str]:
    lanes = settings.model_copy(
        update={"export_async_threshold_rows": 10, "export_fast_lane_max_rows": FAST_LANE_MAX_ROWS}
    )
    with transaction(sessions) as session:
        requested = request_export(
            session,
            settings=lanes,
            flags=FlagCache(sessions),
            user=session.get_one(User, user_id),
            slug=slug,
            body={"filters": filters},
            idempotency_key=None,
        )
        export_id = str(requested.job.id)
    with sessions() as session:
        payload = session.scalar(
            select(OutboxMessage.payload).where(OutboxMessage.key == export_id)
        )
    assert payload is not None
    return requested, payload["lane"]


def counted(statements: list[str]) -> bool:
    """Whether the bounded count of the account's orders ran (``count(*)`` over a ``LIMIT``)."""
    return any(
        "count(*)" in sql and "FROM orders" in sql and "LIMIT" in sql and "EXPLAIN" not in sql
        for sql in statements
    )


def test_a_request_the_estimate_shows_to_be_big_counts_no_rows(
    settings: Settings, sessions: sessionmaker[Session], user_id: int, statements: list[str]
) -> None:
    # When the admin of a big account asks for all of its orders
    requested, lane = request(settings, sessions, user_id, "sized-big", {})
    # Then the planner's estimate decides: no bounded count, the normal lane, a background job
    assert not counted(statements), statements
    assert any(sql.startswith("EXPLAIN") for sql in statements)
    assert lane == NORMAL
    assert not requested.inline


def test_a_text_search_is_still_counted(
    settings: Settings, sessions: sessionmaker[Session], user_id: int, statements: list[str]
) -> None:
    # When the request filters by a text search (whose estimates are rough)
    requested, lane = request(settings, sessions, user_id, "sized-big", {"q": "example.test"})
    # Then the bounded count decides, as before
    assert counted(statements), statements
    assert lane == NORMAL
    assert not requested.inline


def test_a_small_account_is_counted_and_takes_the_fast_lane(
    settings: Settings, sessions: sessionmaker[Session], user_id: int, statements: list[str]
) -> None:
    # When the estimate is near or under the count budget
    requested, lane = request(settings, sessions, user_id, "sized-small", {})
    # Then the exact bounded count decides the lane
    assert counted(statements), statements
    assert lane == FAST
    assert not requested.inline  # 40 rows > the inline bound of 10


class RecordingConnection(psycopg.Connection[Any]):
    """A connection that records the SQL of every ``execute``."""

    sent: ClassVar[list[str]] = []

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        RecordingConnection.sent.append(str(query))
        return super().execute(query, params, **kwargs)


def test_the_workers_estimate_counts_only_where_the_planner_cannot_settle_it(
    database_url: str, sessions: sessionmaker[Session], user_id: int
) -> None:
    with sessions() as session:
        big, small = (
            session.scalars(select(Account).where(Account.slug == slug)).one()
            for slug in ("sized-big", "sized-small")
        )
        session.expunge_all()
    pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
        database_url, min_size=1, max_size=1, connection_class=RecordingConnection, open=True
    )
    estimates: dict[str, tuple[int, list[str]]] = {}
    with pool:
        for account, filters in ((big, {}), (small, {}), (big, {"q": "example.test"})):
            with ExportQuery(
                database_url=database_url, statement_timeout_seconds=60, pool=pool
            ) as query:
                RecordingConnection.sent.clear()
                rows = query.estimate(
                    account, OrderFilters(**filters), exact_up_to=FAST_LANE_MAX_ROWS
                )
                estimates[f"{account.slug} {filters}"] = (rows, list(RecordingConnection.sent))
    # A big export's total for progress is the planner's estimate: no rows are read for it
    rows, sent = estimates["sized-big {}"]
    assert not counted(sent), sent
    assert abs(rows - BIG_ORDERS) <= BIG_ORDERS * 0.1
    # A small one is counted exactly, and so is a text search (its estimate is rough)
    rows, sent = estimates["sized-small {}"]
    assert counted(sent) and rows == SMALL_ORDERS
    rows, sent = estimates["sized-big {'q': 'example.test'}"]
    assert counted(sent) and rows > FAST_LANE_MAX_ROWS
