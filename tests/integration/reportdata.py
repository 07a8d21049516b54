"""Test data for the report tests and an independent (pure Python) model of the report."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg.rows import dict_row
from sqlalchemy.orm import Session, sessionmaker

from shared.db import libpq_url, transaction
from shared.identity import create_token, ensure_account, set_membership, upsert_user
from shared.models import Order, Role
from shared.seeding import seed_orders

TIMEZONE = "Europe/Berlin"
UTC = dt.UTC


@dataclass(frozen=True)
class Population:
    """Who is who in the test database, with a bearer token each."""

    tokens: dict[str, str]
    account_id: int
    other_account_id: int


def order(
    account_id: int, number: str, placed_at: dt.datetime, name: str, total: str, **kw: Any
) -> Order:
    """One order of ``total`` (one item, no shipping); ``kw``: email, status, channel, tax."""
    values: dict[str, Any] = {
        "email": "edge@example.test",
        "status": "paid",
        "channel": "web",
        "tax": "0.00",
    }
    values.update(kw)
    amount = Decimal(total)
    return Order(
        account_id=account_id,
        number=number,
        placed_at=placed_at,
        customer_name=name,
        customer_email=values["email"],
        status=values["status"],
        channel=values["channel"],
        items_count=1,
        subtotal=amount,
        tax=Decimal(values["tax"]),
        shipping=Decimal("0.00"),
        total=amount,
        currency="EUR",
    )


def populate(sessions: sessionmaker[Session], *, orders: int = 3000) -> Population:
    with transaction(sessions) as session:
        acme = ensure_account(session, slug="acme", name="Acme", timezone=TIMEZONE)
        globex = ensure_account(session, slug="globex", name="Globex", timezone="America/New_York")
        people = {
            "admin": ("admin@acme.test", acme, Role.ADMIN),
            "member": ("member@acme.test", acme, Role.MEMBER),
            "outsider": ("admin@globex.test", globex, Role.ADMIN),
        }
        tokens = {}
        for key, (email, account, role) in people.items():
            user = upsert_user(session, email=email, password="correct horse battery")
            set_membership(session, account=account, user=user, role=role)
            tokens[key] = create_token(session, user)
        seed_orders(session, acme, orders=orders, seed=7)
        seed_orders(session, globex, orders=500, seed=8)
        # Edge cases: the spring-forward DST switch in Berlin (2025-03-30 02:00 -> 03:00 local),
        # local midnight boundaries, and text that looks like SQL or LIKE patterns.
        session.add_all(
            [
                order(
                    acme.id,
                    "E-1",
                    dt.datetime(2025, 3, 30, 0, 59, tzinfo=UTC),
                    "Before DST",
                    "1.00",
                ),
                order(
                    acme.id, "E-2", dt.datetime(2025, 3, 30, 1, 0, tzinfo=UTC), "After DST", "2.00"
                ),
                order(
                    acme.id,
                    "E-3",
                    dt.datetime(2025, 3, 29, 23, 0, tzinfo=UTC),
                    "Local midnight",
                    "3.00",
                ),
                order(
                    acme.id,
                    "E-4",
                    dt.datetime(2025, 3, 29, 22, 59, tzinfo=UTC),
                    "Just before",
                    "4.00",
                ),
                order(
                    acme.id,
                    "E-5",
                    dt.datetime(2025, 6, 1, 12, 0, tzinfo=UTC),
                    "Robert'); DROP TABLE orders;--",
                    "5.00",
                ),
                order(
                    acme.id,
                    "E-6",
                    dt.datetime(2025, 6, 1, 12, 0, tzinfo=UTC),
                    "100% pure_value",
                    "5.00",
                ),
                order(
                    acme.id,
                    "E-7",
                    dt.datetime(2025, 6, 1, 12, 0, tzinfo=UTC),
                    "Tie on time",
                    "5.00",
                ),
            ]
        )
        return Population(tokens=tokens, account_id=acme.id, other_account_id=globex.id)


def load_orders(database_url: str, account_id: int) -> list[dict[str, Any]]:
    """Raw rows straight from the table (no report SQL involved)."""
    with psycopg.connect(libpq_url(database_url), row_factory=dict_row) as conn:
        return conn.execute("SELECT * FROM orders WHERE account_id = %s", (account_id,)).fetchall()


def display(row: dict[str, Any], timezone: str) -> dict[str, str]:
    """The report's display values, computed in Python from the spec's wording."""
    local = row["placed_at"].astimezone(ZoneInfo(timezone))
    return {
        "number": row["number"],
        "placed_at": local.strftime("%Y-%m-%d %H:%M"),
        "customer_name": row["customer_name"],
        "customer_email": row["customer_email"],
        "status": row["status"],
        "channel": row["channel"],
        "items_count": str(row["items_count"]),
        "subtotal": f"{row['subtotal']:.2f}",
        "tax": f"{row['tax']:.2f}",
        "shipping": f"{row['shipping']:.2f}",
        "total": f"{row['total']:.2f}",
        "currency": row["currency"],
    }


def expected_rows(
    rows: list[dict[str, Any]], params: dict[str, Any], timezone: str
) -> list[dict[str, str]]:
    """Filter and sort ``rows`` as the spec describes, without SQL."""
    tz = ZoneInfo(timezone)

    def keep(row: dict[str, Any]) -> bool:
        local_day = row["placed_at"].astimezone(tz).date()
        q = params.get("q")
        return (
            (not params.get("status") or row["status"] in params["status"])
            and (not params.get("channel") or row["channel"] in params["channel"])
            and (
                not params.get("placed_from")
                or local_day >= dt.date.fromisoformat(params["placed_from"])
            )
            and (
                not params.get("placed_to")
                or local_day <= dt.date.fromisoformat(params["placed_to"])
            )
            and (
                not q
                or any(
                    q.lower() in row[f].lower()
                    for f in ("number", "customer_name", "customer_email")
                )
            )
            and (params.get("min_total") is None or row["total"] >= Decimal(params["min_total"]))
            and (params.get("max_total") is None or row["total"] <= Decimal(params["max_total"]))
        )

    sort = params.get("sort", "-placed_at")
    field = sort.lstrip("-")
    chosen = sorted(
        (r for r in rows if keep(r)),
        key=lambda r: (r[field], r["id"]),
        reverse=sort.startswith("-"),
    )
    return [display(r, timezone) for r in chosen]


def report_answer(client: Any, population: Population, params: list[tuple[str, str]]) -> Any:
    """The report API's answer to ``params`` for the admin: a page (200) or a refusal (422),
    never anything else."""
    headers = {"Authorization": f"Bearer {population.tokens['admin']}"}
    response = client.get("/api/v1/accounts/acme/orders", params=params, headers=headers)
    assert response.status_code in (200, 422), response.text
    return response
