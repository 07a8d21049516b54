"""Small exports made inside the request, when they fail: a clean JSON error or a hand-over to
the workers, never a 500, and never a failure email (the response already told the user)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import create_app
from shared.devstack.mailsink import MailSink
from shared.devstack.ports import free_port
from shared.events import decode
from shared.models import ExportJob, ExportState
from shared.notifications import Notifier
from shared.settings import Settings
from tests.integration.reportdata import Population, populate
from tests.support.jobs import events_of


@pytest.fixture(scope="module")
def population(sessions: sessionmaker[Session]) -> Population:
    return populate(sessions, orders=300)


@pytest.fixture(scope="module")
def broken_settings(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Inline exports (every one of these is small) against an export database that is down."""
    return settings.model_copy(
        update={
            "storage_url": Path(tmp_path_factory.mktemp("storage")).as_uri(),
            "export_async_threshold_rows": 10_000,
            "export_database_url": f"postgresql://orders@127.0.0.1:{free_port()}/orders",
            "export_max_active_per_user": 50,
        }
    )


def client_for(settings: Settings) -> TestClient:
    return TestClient(
        create_app(settings), base_url="http://127.0.0.1", raise_server_exceptions=False
    )


def post(client: TestClient, population: Population, filters: dict[str, Any]) -> Any:
    return client.post(
        "/api/v1/accounts/acme/order-exports",
        json={"filters": filters},
        headers={"Authorization": f"Bearer {population.tokens['admin']}"},
    )


def test_inline_export_failing_for_good_answers_503_json_and_sends_no_email(
    broken_settings: Settings,
    sessions: sessionmaker[Session],
    population: Population,
    sink: MailSink,
) -> None:
    # Given no automatic retry (one attempt) and an export database that is down
    settings = broken_settings.model_copy(update={"export_max_attempts": 1})
    with client_for(settings) as client:
        # When a small export is made inside the request
        response = post(client, population, {"status": ["paid"]})
    # Then a clean JSON error, not a 500 and not a page
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == "export_failed"
    assert error["reason"] == "database_unavailable"
    assert "Traceback" not in response.text and "psycopg" not in response.text
    with sessions() as session:
        job = session.get_one(ExportJob, error["export_id"])
        assert (job.state, job.error_code) == (ExportState.FAILED, "database_unavailable")
    # And the final ExportFailed says "no email", which the notifier respects
    (failed,) = [e for e in events_of(sessions, error["export_id"]) if e["type"] == "ExportFailed"]
    assert (failed["final"], failed["notify"]) == (True, False)
    notifier = Notifier(
        settings=settings.model_copy(
            update={"smtp_url": sink.url, "public_url": "http://127.0.0.1:9"}
        ),
        sessions=sessions,
    )
    for payload in events_of(sessions, error["export_id"]):
        notifier.handle(decode(json.dumps(payload).encode()))
    assert sink.messages() == []
    assert sum(notifier.outcomes.values()) == 0


def test_inline_export_failing_transiently_is_handed_to_the_workers(
    broken_settings: Settings, sessions: sessionmaker[Session], population: Population
) -> None:
    with client_for(broken_settings) as client:
        response = post(client, population, {"status": ["refunded"]})
    assert response.status_code == 202, response.text
    export = response.json()["export"]
    assert export["state"] == "queued"
    assert export["error"]["code"] == "database_unavailable"
    types = [e["type"] for e in events_of(sessions, export["id"])]
    assert types == ["ExportStarted", "ExportFailed", "ExportRequested"]
