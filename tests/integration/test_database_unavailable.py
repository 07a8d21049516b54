"""The API when its database cannot be had: down, or every pooled connection busy. A clean
503 ``database_unavailable`` with ``Retry-After`` (JSON for the API, a page for browsers),
never a 500 or a trace; the API answers again as soon as the database does."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import create_app
from shared.devstack.ports import free_port
from shared.settings import Settings
from tests.integration.reportdata import Population, populate

REPORT = "/api/v1/accounts/acme/orders"


@pytest.fixture(scope="module")
def population(sessions: sessionmaker[Session]) -> Population:
    return populate(sessions, orders=30)


def client_for(settings: Settings) -> TestClient:
    return TestClient(
        create_app(settings), base_url="http://127.0.0.1", raise_server_exceptions=False
    )


def bearer(population: Population) -> dict[str, str]:
    return {"Authorization": f"Bearer {population.tokens['admin']}"}


def assert_database_unavailable(response: object) -> None:
    from httpx2 import Response

    assert isinstance(response, Response)
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    assert "Traceback" not in response.text
    assert "psycopg" not in response.text.lower() and "sqlalchemy" not in response.text.lower()


@pytest.fixture
def down(app_settings: Settings) -> Iterator[TestClient]:
    """The module's app with its database URL pointing at a port nobody listens on."""
    url = f"postgresql://orders@127.0.0.1:{free_port()}/orders"
    with client_for(app_settings.model_copy(update={"database_url": url})) as client:
        yield client


def test_database_down_answers_503_json_with_retry_after(
    down: TestClient, population: Population
) -> None:
    # Given an API whose database refuses connections
    # When the report and an export request are made
    report = down.get(REPORT, headers=bearer(population))
    export = down.post(
        "/api/v1/accounts/acme/order-exports", json={"filters": {}}, headers=bearer(population)
    )
    # Then both are a 503 JSON error that says what is wrong, with a time to come back
    for response in (report, export):
        assert_database_unavailable(response)
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["error"]["code"] == "database_unavailable"
    # And readiness says the same
    assert down.get("/readyz").status_code == 503


def test_database_down_answers_a_503_page_to_browsers(down: TestClient) -> None:
    # Given the login form (it needs no database)
    form = down.get("/login", headers={"Accept": "text/html"})
    assert form.status_code == 200
    match = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert match is not None
    # When a browser logs in while the database is down
    response = down.post(
        "/login",
        data={"email": "admin@acme.test", "password": "x", "csrf_token": match.group(1)},
        headers={"Accept": "text/html"},
    )
    # Then a 503 page, not a trace
    assert_database_unavailable(response)
    assert response.headers["content-type"].startswith("text/html")
    assert "try again" in response.text.lower()


def test_every_pooled_connection_busy_answers_503_then_recovers(
    app_settings: Settings, population: Population, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an API whose requests wait at most a second for a pooled connection
    settings = app_settings.model_copy(update={"database_pool_timeout_seconds": 1})
    with client_for(settings) as client:
        assert client.get(REPORT, headers=bearer(population)).status_code == 200
        engine = client.app.state.api.engine  # type: ignore[attr-defined]
        with ExitStack() as held:
            # When every connection of its pool (and the overflow) is held elsewhere
            for _ in range(engine.pool.size() + engine.pool._max_overflow):
                held.enter_context(engine.connect())
            response = client.get(REPORT, headers=bearer(population))
            # Then the request gets a 503 with Retry-After, not a 500
            assert_database_unavailable(response)
            assert response.json()["error"]["code"] == "database_unavailable"
        # And the log says which route and why, without SQL
        (line,) = [
            r.getMessage() for r in caplog.records if "database unavailable" in r.getMessage()
        ]
        assert line == f"api: database unavailable for GET {REPORT}: TimeoutError"
        # And once the connections are back, the report answers again
        assert client.get(REPORT, headers=bearer(population)).status_code == 200
