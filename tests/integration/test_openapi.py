"""The API against its own OpenAPI description (schemathesis, property-based): any generated
request gets a documented status and a body matching the schema — never a 5xx."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import create_app
from services.api.openapi import document
from shared.settings import Settings
from tests.integration.reportdata import Population, populate

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def population(sessions: sessionmaker[Session]) -> Population:
    return populate(sessions, orders=300)


@pytest.fixture(scope="module")
def app_settings(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    storage = Path(tmp_path_factory.mktemp("storage"))
    return settings.model_copy(
        update={"storage_url": storage.as_uri(), "export_max_active_per_user": 50}
    )


@pytest.fixture(scope="module")
def api_schema(app_settings: Settings, population: Population) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(app_settings))


#: "METHOD /path" of every documented operation (one test each).
OPERATIONS = [
    f"{method.upper()} {path}" for path, item in document()["paths"].items() for method in item
]


@pytest.mark.parametrize("label", OPERATIONS)
def test_every_operation_conforms(
    api_schema: schemathesis.BaseSchema, population: Population, label: str
) -> None:
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]
    headers = {"Authorization": f"Bearer {population.tokens['admin']}"}

    @hypothesis_settings(
        max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy())
    def check(case: schemathesis.Case) -> None:
        # Aim the requests at the real account so that they get past the membership check.
        if case.path_parameters and "slug" in case.path_parameters:
            case.path_parameters["slug"] = "acme"
        case.call_and_validate(headers=headers, checks=CHECKS)

    check()


def test_document_is_served_and_lists_every_json_route(app_settings: Settings) -> None:
    with TestClient(create_app(app_settings), base_url="http://127.0.0.1") as client:
        served = client.get("/openapi.json")
    assert served.status_code == 200 and served.json() == document()
    assert set(served.json()["paths"]) == {
        "/api/v1/accounts/{slug}/orders",
        "/api/v1/accounts/{slug}/order-exports",
        "/api/v1/order-exports/{export_id}",
        "/api/v1/order-exports/{export_id}/retry",
        "/api/v1/order-exports/{export_id}/cancel",
        "/api/v1/order-exports/{export_id}/file",
        "/api/v1/order-exports/{export_id}/downloads",
        "/exports/{export_id}/download",
        "/healthz",
        "/readyz",
    }
