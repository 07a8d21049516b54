"""The CSV formula guard, end to end over HTTP against real PostgreSQL: orders whose text cells
start with a trigger behind spaces, NBSP, ideographic space, zero-width space, BOM or other format
characters, or with a full-width trigger, come out of an export prefixed with ``'`` (the value
itself unchanged); harmless text and every numeric column come out untouched. PostgreSQL's guard
and its Python twin agree on any text."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import literal, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import create_app
from shared.columns import formula_guarded, guard_text
from shared.db import transaction
from shared.identity import create_token, ensure_account, set_membership, upsert_user
from shared.models import Role
from shared.settings import Settings
from tests.integration.reportdata import order

#: Each variant of a hidden or disguised trigger, as a customer name (all must be guarded).
GUARDED = [
    "=1+1",
    " =1+1",
    "   +SUM(A1)",
    '\u00a0=HYPERLINK("http://evil.test")',  # NBSP
    "\u3000-2+3",  # ideographic space
    "\u200b@SUM(A1)",  # zero-width space (Cf)
    "\ufeff=1+1",  # BOM (Cf)
    "\u2060\u200d+1",  # word joiner, zero-width joiner (Cf)
    "\u202e=1+1",  # right-to-left override (Cf)
    "\u00ad-1",  # soft hyphen (Cf)
    "\u2003\u205f=1",  # em space, medium mathematical space
    "\n=1+1",
    "\u0085=1",  # next line (White_Space)
    "\uff1d1+1",  # full-width =
    "\uff0bcmd",  # full-width +
    "\uff0d1",  # full-width -
    "\uff20SUM(A1)",  # full-width @
    " \uff1dx",
    "\tTab",
    "\rCR",
]
#: Text that only looks close: never changed.
UNCHANGED = [
    "Anna",
    " Anna",
    "\u00a0Bob",
    "\u200bCarla",
    "a=b",
    "Łukasz",
    "山田 =x",
    "",
    "1+1",
]


@pytest.fixture(scope="module")
def token(sessions: sessionmaker[Session]) -> str:
    with transaction(sessions) as session:
        account = ensure_account(session, slug="guard", timezone="UTC")
        user = upsert_user(session, email="admin@guard.test", password="long-enough-pw")
        set_membership(session, account=account, user=user, role=Role.ADMIN)
        placed = dt.datetime(2025, 5, 1, 12, 0, tzinfo=dt.UTC)
        for index, name in enumerate(GUARDED + UNCHANGED):
            session.add(
                order(
                    account.id,
                    name or "N-empty",  # the order number is a text column as well
                    placed + dt.timedelta(minutes=index),
                    name,
                    "-5.00" if index % 2 else "12.50",
                    email=(name or "empty") + "@x.test",
                    tax="-1.00",
                )
            )
        return create_token(session, user)


@pytest.fixture(scope="module")
def client(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    storage = Path(tmp_path_factory.mktemp("storage")).as_uri()
    with TestClient(
        create_app(settings.model_copy(update={"storage_url": storage})),
        base_url="http://127.0.0.1",
    ) as client:
        yield client


def exported_rows(client: TestClient, token: str) -> list[dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"}
    made = client.post(
        "/api/v1/accounts/guard/order-exports",
        json={"filters": {"sort": "placed_at"}},
        headers=headers,
    )
    assert made.status_code == 201, made.text
    body = client.get(made.json()["export"]["download_url"], headers=headers)
    assert body.status_code == 200
    return list(csv.DictReader(io.StringIO(body.content.decode(), newline="")))


def test_every_hidden_or_full_width_trigger_is_guarded(client: TestClient, token: str) -> None:
    rows = exported_rows(client, token)
    assert len(rows) == len(GUARDED) + len(UNCHANGED)
    for row, name in zip(rows, GUARDED + UNCHANGED, strict=True):
        if name in GUARDED:
            assert row["Customer"] == "'" + name, repr(name)
            assert row["Email"] == "'" + name + "@x.test", repr(name)
            assert row["Order"] == "'" + name, repr(name)
        else:
            assert row["Customer"] == name, repr(name)
            assert row["Email"] == (name or "empty") + "@x.test", repr(name)


def test_numeric_columns_are_untouched(client: TestClient, token: str) -> None:
    rows = exported_rows(client, token)
    assert {row["Total"] for row in rows} == {"-5.00", "12.50"}
    assert {row["Tax"] for row in rows} == {"-1.00"}
    assert all(not row["Subtotal"].startswith("'") for row in rows)


@hypothesis_settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
@given(
    st.text(
        st.sampled_from(
            " \t\r\n\u00a0\u3000\u200b\ufeff\u2060\u00ad=+-@\uff1d\uff0b\uff0d\uff20ax1"
        )
        | st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
        max_size=6,
    )
)
def test_postgres_and_python_guard_agree(sessions: sessionmaker[Session], value: str) -> None:
    with sessions() as session:
        in_sql = session.scalar(select(formula_guarded(literal(value))))
    assert in_sql == guard_text(value)
