"""Realistic demo orders, inserted in bulk by PostgreSQL itself (``INSERT ... SELECT``).

Every value is a function of (seed, row number) through ``hashint8extended``, so a given
``--seed`` always produces the same orders. Orders are placed in number order across the seeded
period, as in a real shop; this also keeps three of the four indexes append-only, which makes
500,000 orders take seconds.

The ``q`` search's indexes (``ORDER_SEARCH_INDEXES``: the trigram indexes of the search document
and the number, the B-trees of the customer's name and email) cost far more to keep up to date
row by row than to build once, so a bulk load that at least doubles the orders table drops them
and builds them again after the insert (in the same transaction; readers of ``orders`` wait for
the seed to commit). Smaller loads insert with the indexes in place, as production inserts do.
The distinct names and emails (``order_search_terms``) follow by the orders' statement trigger
either way: one ``INSERT ... SELECT`` adds each distinct term once.
"""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateIndex

from shared.identity import ensure_account, find_user, set_membership, upsert_user
from shared.models import (
    ORDER_SEARCH_INDEXES,
    ORDER_SEARCH_STATISTICS,
    ORDER_SEARCH_STATISTICS_INDEXES,
    Account,
    Base,
    Order,
    Role,
)
from shared.settings import Settings

#: Demo login of the account admin (also in the README).
DEMO_ADMIN = ("admin@acme.test", "admin-password")
#: Demo login of a plain member.
DEMO_MEMBER = ("member@acme.test", "member-password")
#: Slug of the demo account.
DEMO_ACCOUNT = "acme"

#: Customer names, among them the awkward ones every CSV writer must survive.
CUSTOMER_NAMES = (
    "Ada Lovelace", "Grace Hopper", "Alan Turing", "Katherine Johnson", "Linus Torvalds",
    "Margaret Hamilton", "Zoë Šimić", "Łukasz Żółć", "José Núñez", "Søren Kierkegaard",
    "山田 太郎", "Анна Каренина", "محمد علي", "Ngozi Okonjo-Iweala", "Björk Guðmundsdóttir",
    "Smith, John", 'Robert "Bobby" Tables', "O'Brien & Sons, Ltd.", "Line\nBreak Ltd",
    "=HYPERLINK(\"http://evil.test\",\"click\")", "+44 20 7946 0000", "-Minus Corp",
    "@handle", "\tTabbed Name", "Semi;colon", "Emoji 🚀 Shop",
    # Triggers behind characters a spreadsheet trims, and full-width ones (formula guard).
    " =1+1 Spaced", "\u00a0+NBSP Ltd", "\u3000-Ideographic", "\u200b@ZeroWidth",
    "\ufeff=BOM Corp", "\uff1dFullWidth",
)  # fmt: skip
#: Weighted statuses (repeats make the common ones common).
STATUS_WEIGHTS = ("paid",) * 4 + ("fulfilled",) * 4 + ("pending", "refunded", "canceled")
CHANNEL_WEIGHTS = ("web",) * 5 + ("pos",) * 2 + ("marketplace",) * 2 + ("phone",)
CURRENCIES = ("EUR", "USD", "GBP", "CHF")
#: First instant of the seeded period; orders spread over the two years after it.
PERIOD_START = "2025-01-01T00:00:00+00:00"
PERIOD_SECONDS = 2 * 365 * 86400
#: Loads smaller than this always insert with the search indexes in place.
REBUILD_MIN_ORDERS = 50_000
#: Memory for building the search indexes after a bulk load (GIN builds are faster with more).
REBUILD_MAINTENANCE_WORK_MEM = "256MB"

_INSERT = text(
    """
    INSERT INTO orders (account_id, number, placed_at, customer_name, customer_email, status,
                        channel, items_count, subtotal, tax, shipping, total, currency)
    SELECT :account_id,
           'A-' || CASE WHEN n < 1000000 THEN lpad(n::text, 6, '0') ELSE n::text END,
           CAST(:period_start AS timestamptz)
               + make_interval(secs => (g + (h1 % 1000) / 1000.0) * :period_seconds / :count),
           (CAST(:names AS text[]))[1 + h2 % cardinality(CAST(:names AS text[]))],
           CASE WHEN h3 % 97 = 0 THEN '+orders' ELSE '' END
               || 'customer' || (h3 % 50000) || '@example.test',
           (CAST(:statuses AS text[]))[1 + h4 % cardinality(CAST(:statuses AS text[]))],
           (CAST(:channels AS text[]))[1 + h5 % cardinality(CAST(:channels AS text[]))],
           1 + h6 % 12,
           subtotal,
           round(subtotal * 0.2, 2),
           shipping,
           subtotal + round(subtotal * 0.2, 2) + shipping,
           (CAST(:currencies AS text[]))[1 + h7 % cardinality(CAST(:currencies AS text[]))]
    FROM (
        SELECT g, n, h1, h2, h3, h4, h5, h6, h7,
               (h8 % 200000) / 100.0 AS subtotal,
               (ARRAY[0, 4.99, 9.99, 14.5])[1 + h9 % 4] AS shipping
        FROM (
            SELECT g, :first_number + g AS n,
                   hashint8extended(g, :seed * 16 + 1) & 2147483647 AS h1,
                   hashint8extended(g, :seed * 16 + 2) & 2147483647 AS h2,
                   hashint8extended(g, :seed * 16 + 3) & 2147483647 AS h3,
                   hashint8extended(g, :seed * 16 + 4) & 2147483647 AS h4,
                   hashint8extended(g, :seed * 16 + 5) & 2147483647 AS h5,
                   hashint8extended(g, :seed * 16 + 6) & 2147483647 AS h6,
                   hashint8extended(g, :seed * 16 + 7) & 2147483647 AS h7,
                   hashint8extended(g, :seed * 16 + 8) & 2147483647 AS h8,
                   hashint8extended(g, :seed * 16 + 9) & 2147483647 AS h9
            FROM generate_series(CAST(0 AS bigint), CAST(:count AS bigint) - 1) AS g
        ) AS hashes
    ) AS rows
    """
)


def order_count(session: Session, account: Account) -> int:
    return int(session.scalar(select(func.count()).where(Order.account_id == account.id)) or 0)


def _table_rows(session: Session) -> int:
    """The orders table's row count as the statistics have it (no scan)."""
    rows = session.scalar(text("SELECT reltuples FROM pg_class WHERE oid = 'orders'::regclass"))
    return max(0, int(rows or 0))


def rebuilds_search_index(session: Session, orders: int) -> bool:
    """True when a load of ``orders`` orders builds the search indexes after the insert."""
    return orders >= REBUILD_MIN_ORDERS and orders >= _table_rows(session)


def drop_search_indexes(session: Session) -> None:
    """Drop the search indexes before a bulk load (:func:`build_search_indexes` after it)."""
    for name in ORDER_SEARCH_INDEXES:
        session.execute(text(f"DROP INDEX IF EXISTS {name}"))


def build_search_indexes(session: Session) -> None:
    """Create the search indexes (after a bulk load that dropped them)."""
    for index in Base.metadata.tables["orders"].indexes:
        if index.name in ORDER_SEARCH_INDEXES:
            session.execute(CreateIndex(index, if_not_exists=True))
    # A new index starts at the default statistics target; the next ANALYZE needs the fine one.
    for name in ORDER_SEARCH_STATISTICS_INDEXES:
        session.execute(
            text(f"ALTER INDEX {name} ALTER COLUMN 1 SET STATISTICS {ORDER_SEARCH_STATISTICS}")
        )


def seed_orders(
    session: Session,
    account: Account,
    *,
    orders: int,
    seed: int = 0,
    rebuild_index: bool | None = None,
) -> int:
    """Add ``orders`` orders to ``account``; numbers continue after the existing ones.

    ``rebuild_index``: drop the search indexes and build them after the insert (None: when the
    load at least doubles the table, see :func:`rebuilds_search_index`; False: insert into the
    indexes as they are, e.g. when the caller dropped them for several loads and builds them at
    the end).
    """
    if orders < 0:
        raise ValueError("orders must be >= 0")
    first = order_count(session, account) + 1
    if orders:
        rebuild = rebuilds_search_index(session, orders) if rebuild_index is None else rebuild_index
        if rebuild:
            drop_search_indexes(session)
        session.execute(
            _INSERT,
            {
                "account_id": account.id,
                "first_number": first,
                "seed": seed,
                "count": orders,
                "period_start": PERIOD_START,
                "period_seconds": PERIOD_SECONDS,
                "names": list(CUSTOMER_NAMES),
                "statuses": list(STATUS_WEIGHTS),
                "channels": list(CHANNEL_WEIGHTS),
                "currencies": list(CURRENCIES),
            },
        )
        if rebuild:
            session.execute(
                text(f"SET LOCAL maintenance_work_mem = '{REBUILD_MAINTENANCE_WORK_MEM}'")
            )
            build_search_indexes(session)
        # Fresh statistics, or the planner sorts half a million rows it thinks are a thousand
        # (this also gathers the search expression's statistics, through its index).
        session.execute(text("ANALYZE orders"))
        # The distinct names and emails grew by the trigger: without fresh statistics the
        # planner takes them for the empty table the migration analyzed and filters them all.
        session.execute(text("ANALYZE order_search_terms"))
    return orders


def ensure_demo_data(settings: Settings, *, orders: int) -> None:
    """The demo account, its two users and ``orders`` orders; safe to run on every start."""
    from shared.db import make_engine, make_sessionmaker, transaction

    engine = make_engine(settings.database_url, pool_size=1)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            account = ensure_account(
                session, slug=DEMO_ACCOUNT, name="Acme Inc.", timezone="Europe/Berlin"
            )
            # Lock the account row so two concurrent starts do not both seed.
            session.execute(select(Account.id).where(Account.id == account.id).with_for_update())
            for (email, password), role in ((DEMO_ADMIN, Role.ADMIN), (DEMO_MEMBER, Role.MEMBER)):
                if find_user(session, email) is None:
                    user = upsert_user(session, email=email, password=password)
                    set_membership(session, account=account, user=user, role=role)
            missing = orders - order_count(session, account)
            if missing > 0:
                seed_orders(session, account, orders=missing)
    finally:
        engine.dispose()
