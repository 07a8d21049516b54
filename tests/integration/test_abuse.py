"""Bad input and access rules over HTTP against real PostgreSQL: fuzzed requests never cause a
5xx or leak SQL, exports never cross accounts, and every endpoint answers every kind of caller
with exactly the expected status."""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import text, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from shared.db import transaction
from shared.filters import FILTER_NAMES, SORTS
from shared.identity import (
    create_token,
    find_user,
    get_account,
    remove_membership,
    set_membership,
    upsert_user,
)
from shared.models import ORDER_CHANNELS, ORDER_STATUSES, ExportJob, Role, User
from shared.settings import Settings
from shared.signing import SigningKeys, download_path
from tests.integration.reportdata import Population, populate, report_answer

#: Marks every row of the other account, so a leak would be visible in any file.
FOREIGN_MARKER = "GLOBEX-ONLY"
#: Words that must never reach a client (database errors, driver names, stack traces).
LEAKS = ("select ", "psycopg", "sqlalchemy", "traceback", "syntax error", 'file "')
FUZZ = hypothesis_settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


#: What the module's app changes of the test settings (tests/integration/conftest.py).
APP_SETTINGS = {"export_max_active_per_user": 1000}


@pytest.fixture(scope="module")
def population(sessions: sessionmaker[Session]) -> Population:
    people = populate(sessions, orders=400)
    with transaction(sessions) as session:
        session.execute(
            text(
                "UPDATE orders SET customer_name = :marker || customer_name"
                " WHERE account_id = :other"
            ),
            {"marker": FOREIGN_MARKER, "other": people.other_account_id},
        )
    return people


def bearer(population: Population, who: str = "admin") -> dict[str, str]:
    return {"Authorization": f"Bearer {population.tokens[who]}"}


def assert_clean_error(response: Any) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"]
        lowered = response.text.lower()
        assert not any(leak in lowered for leak in LEAKS), response.text


nasty_text = st.one_of(
    st.text(max_size=300),
    st.sampled_from(
        [
            "'; DROP TABLE orders;--",
            "%",
            "_",
            "\\",
            "' OR 1=1 --",
            "\x00",
            "😀" * 50,
            "A-0%",
            "NaN",
            "1e400",
        ]
    ),
)
query_values = st.one_of(
    nasty_text, st.sampled_from([*ORDER_STATUSES, *ORDER_CHANNELS, *SORTS, "2025-03-30"])
)
query_names = st.one_of(st.sampled_from([*FILTER_NAMES, "limit", "cursor"]), st.text(max_size=10))


@FUZZ
@given(params=st.lists(st.tuples(query_names, query_values), max_size=8))
def test_fuzzed_report_queries_are_200_or_422(
    client: TestClient, population: Population, params: list[tuple[str, str]]
) -> None:
    response = report_answer(client, population, params)
    assert_clean_error(response)
    if response.status_code == 422:
        assert response.json()["error"]["code"] == "validation_error"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | nasty_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=10,
)
filter_objects = st.dictionaries(
    st.sampled_from(FILTER_NAMES) | st.text(max_size=8), json_values, max_size=5
)


@FUZZ
@given(
    body=st.one_of(
        json_values,
        st.fixed_dictionaries({"filters": filter_objects}, optional={"options": json_values}),
    )
)
def test_fuzzed_export_requests_never_fail_on_the_server(
    client: TestClient, population: Population, body: object
) -> None:
    response = client.post(
        "/api/v1/accounts/acme/order-exports", json=body, headers=bearer(population)
    )
    assert response.status_code in (200, 201, 202, 422), response.text
    assert_clean_error(response)


@FUZZ
@given(raw=st.binary(max_size=200))
@example(raw=b'{"filters": {"min_total": NaN, "max_total": Infinity}}')
@example(raw=b'{"filters": {"q": "\\u0000"}}')
def test_undecodable_bodies_are_422(client: TestClient, population: Population, raw: bytes) -> None:
    response = client.post(
        "/api/v1/accounts/acme/order-exports",
        content=raw,
        headers={**bearer(population), "Content-Type": "application/json"},
    )
    assert_clean_error(response)


valid_filters = st.fixed_dictionaries(
    {},
    optional={
        "status": st.lists(st.sampled_from(ORDER_STATUSES), max_size=3),
        "channel": st.lists(st.sampled_from(ORDER_CHANNELS), max_size=2),
        "placed_from": st.dates(dt.date(2024, 12, 1), dt.date(2027, 1, 31)).map(dt.date.isoformat),
        "q": st.sampled_from(
            ["a", "e", "customer1", "A-00", "globex", FOREIGN_MARKER.lower(), "o'b"]
        ),
        "min_total": st.integers(0, 2000).map(str),
        "sort": st.sampled_from(list(SORTS)),
    },
)


@hypothesis_settings(
    max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
@given(filters=valid_filters)
def test_an_export_never_contains_another_accounts_rows(
    client: TestClient, population: Population, filters: dict[str, Any]
) -> None:
    response = client.post(
        "/api/v1/accounts/acme/order-exports", json={"filters": filters}, headers=bearer(population)
    )
    assert response.status_code == 201, response.text  # small account: made in the request
    export = response.json()["export"]
    body = client.get(export["download_url"], headers=bearer(population)).text
    rows = list(csv.reader(io.StringIO(body, newline="")))[1:]
    assert FOREIGN_MARKER not in body
    report = client.get(
        "/api/v1/accounts/acme/orders",
        params={**filters, "limit": 1000},
        headers=bearer(population),
    ).json()
    assert [r[0] for r in rows] == [r["number"] for r in report["rows"]]


class TestAuthorizationMatrix:
    """Every endpoint x every kind of caller -> the exact status."""

    PERSONAS = ("anonymous", "outsider", "member", "admin", "removed", "deactivated")

    @pytest.fixture(scope="class")
    @classmethod
    def world(
        cls,
        client: TestClient,
        population: Population,
        sessions: sessionmaker[Session],
        app_settings: Settings,
    ) -> dict[str, Any]:
        with transaction(sessions) as session:
            account = get_account(session, "acme")
            removed = upsert_user(session, email="removed@acme.test", password="long-enough-pw")
            gone = upsert_user(session, email="gone@acme.test", password="long-enough-pw")
            for user in (removed, gone):
                set_membership(session, account=account, user=user, role=Role.ADMIN)
            tokens = {
                "removed": create_token(session, removed),
                "deactivated": create_token(session, gone),
            }
            ids = {name: user.id for name, user in (("removed", removed), ("deactivated", gone))}
            for who, email in (
                ("outsider", "admin@globex.test"),
                ("member", "member@acme.test"),
                ("admin", "admin@acme.test"),
            ):
                found = find_user(session, email)
                assert found is not None
                ids[who] = found.id
        ready = client.post(
            "/api/v1/accounts/acme/order-exports",
            json={"filters": {"status": ["refunded"]}},
            headers=bearer(population),
        )
        assert ready.status_code == 201
        keys = SigningKeys.from_settings(app_settings)
        soon = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        export_id = ready.json()["export"]["id"]
        links = {
            who: download_path(keys, export_id=export_id, user_id=ids.get(who, 0), expires_at=soon)
            for who in cls.PERSONAS
        }
        # The removed admin got their link while still an admin; then lost the membership.
        with transaction(sessions) as session:
            account = get_account(session, "acme")
            remove_membership(session, account=account, user=session.get_one(User, ids["removed"]))
            session.execute(
                update(User).where(User.id == ids["deactivated"]).values(is_active=False)
            )
        return {"tokens": {**population.tokens, **tokens}, "export_id": export_id, "links": links}

    def headers(self, world: dict[str, Any], who: str) -> dict[str, str]:
        return {} if who == "anonymous" else {"Authorization": f"Bearer {world['tokens'][who]}"}

    def queued_export(
        self,
        client: TestClient,
        population: Population,
        sessions: sessionmaker[Session],
        state: str,
    ) -> str:
        from shared import lifecycle
        from shared.models import ExportState
        from tests.support.jobs import make_job

        with sessions() as session:
            admin = find_user(session, "admin@acme.test")
            assert admin is not None
            admin_id = admin.id
        export_id = make_job(
            sessions, account_id=population.account_id, user_id=admin_id, state=ExportState(state)
        )
        assert lifecycle.TRANSITIONS
        return str(export_id)

    #: endpoint -> expected status per persona, in the order of PERSONAS
    EXPECTED: dict[str, tuple[int, ...]] = {
        "report_json": (401, 404, 200, 200, 404, 401),
        "report_html": (303, 404, 200, 200, 404, 303),
        "export_create": (401, 404, 403, 201, 404, 401),
        "export_list": (401, 404, 403, 200, 404, 401),
        "export_detail": (401, 404, 404, 200, 404, 401),
        "export_retry": (401, 404, 404, 202, 404, 401),
        "export_cancel": (401, 404, 404, 202, 404, 401),
        "download": (401, 404, 403, 200, 404, 401),
    }

    @pytest.mark.parametrize("endpoint", list(EXPECTED))
    @pytest.mark.parametrize("who", PERSONAS)
    def test_matrix(
        self,
        client: TestClient,
        population: Population,
        sessions: sessionmaker[Session],
        world: dict[str, Any],
        endpoint: str,
        who: str,
    ) -> None:
        headers = self.headers(world, who)
        expected = self.EXPECTED[endpoint][self.PERSONAS.index(who)]
        if endpoint == "report_json":
            response = client.get("/api/v1/accounts/acme/orders?limit=1", headers=headers)
        elif endpoint == "report_html":
            response = client.get(
                "/accounts/acme/orders?limit=1",
                headers={**headers, "Accept": "text/html"},
                follow_redirects=False,
            )
        elif endpoint == "export_create":
            body = {"filters": {"q": f"matrix-{who}"}}
            response = client.post(
                "/api/v1/accounts/acme/order-exports", json=body, headers=headers
            )
        elif endpoint == "export_list":
            response = client.get("/api/v1/accounts/acme/order-exports", headers=headers)
        elif endpoint == "export_detail":
            response = client.get(f"/api/v1/order-exports/{world['export_id']}", headers=headers)
        elif endpoint == "export_retry":
            export_id = self.queued_export(client, population, sessions, "canceled")
            response = client.post(f"/api/v1/order-exports/{export_id}/retry", headers=headers)
        elif endpoint == "export_cancel":
            export_id = self.queued_export(client, population, sessions, "queued")
            response = client.post(f"/api/v1/order-exports/{export_id}/cancel", headers=headers)
        else:
            response = client.get(world["links"][who], headers=headers)
        assert response.status_code == expected, (endpoint, who, response.text[:300])
        if expected == 303:
            assert response.headers["location"].startswith("/login?next=")


def test_an_unknown_export_state_filter_cannot_reach_sql(
    client: TestClient, population: Population, sessions: sessionmaker[Session]
) -> None:
    with sessions() as session:
        before = session.scalar(text("SELECT count(*) FROM export_jobs"))
    response = client.get("/api/v1/order-exports/' OR '1'='1", headers=bearer(population))
    assert response.status_code == 404
    with sessions() as session:
        assert session.scalar(text("SELECT count(*) FROM export_jobs")) == before
    assert ExportJob.__tablename__ == "export_jobs"
