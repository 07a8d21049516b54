"""The API against its own generated OpenAPI description (schemathesis, property-based, every
check it has): any generated request gets a documented status, headers and a body matching the
schema — never a 5xx — with real path values (the account's slug, an existing export's id)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import CHECKS, load_all_checks
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import app_routes, create_app
from services.api.openapi import document
from shared.models import ExportState
from shared.settings import Settings
from tests.integration.reportdata import Population, populate
from tests.support.jobs import make_job

load_all_checks()
#: Every check schemathesis has.
ALL_CHECKS = CHECKS.get_all()


#: What the module's app changes of the test settings (tests/integration/conftest.py).
APP_SETTINGS = {"export_max_active_per_user": 50}


@pytest.fixture(scope="module")
def population(sessions: sessionmaker[Session]) -> Population:
    return populate(sessions, orders=300)


#: Requests a schema can call valid but the code refuses (422) by a rule across fields or rows
#: that no schema states: placed_from after placed_to, min_total above max_total, a cursor that
#: is stale or not one the API made, more rows than EXPORT_MAX_ROWS.
CROSS_FIELD_RULES = ("/api/v1/accounts/{slug}/orders", "/api/v1/accounts/{slug}/order-exports")
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]


@pytest.fixture(scope="module")
def api_schema(app_settings: Settings, population: Population) -> schemathesis.BaseSchema:
    config = schemathesis.config.SchemathesisConfig.from_dict(
        {
            "operations": [
                {
                    "include-path": path,
                    "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED}},
                }
                for path in CROSS_FIELD_RULES
            ]
        }
    )
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(app_settings), config=config)


@pytest.fixture(scope="module")
def export_id(sessions: sessionmaker[Session], population: Population) -> str:
    """A real export of the account (failed: it can be retried, read and audited)."""
    with sessions() as session:
        from shared.models import User

        admin = session.query(User).filter_by(email="admin@acme.test").one()
    return str(
        make_job(
            sessions,
            account_id=population.account_id,
            user_id=admin.id,
            state=ExportState.FAILED,
            error_code="storage_unavailable",
            error_message="The file could not be stored.",
            error_class="retryable",
        )
    )


#: "METHOD /path" of every documented operation (one test each).
OPERATIONS = [
    f"{method.upper()} {path}"
    for path, item in document(app_routes())["paths"].items()
    for method in item
]


@pytest.mark.parametrize("label", OPERATIONS)
def test_every_operation_conforms(
    api_schema: schemathesis.BaseSchema, population: Population, export_id: str, label: str
) -> None:
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]
    headers = {"Authorization": f"Bearer {population.tokens['admin']}"}

    @hypothesis_settings(
        max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=operation.as_strategy())
    def check(case: schemathesis.Case) -> None:
        # Aim the requests at the real account and export, past the membership check.
        if case.path_parameters and "slug" in case.path_parameters:
            case.path_parameters["slug"] = "acme"
        if case.path_parameters and "export_id" in case.path_parameters:
            case.path_parameters["export_id"] = export_id
        case.call_and_validate(headers=headers, checks=ALL_CHECKS)

    check()


def test_document_is_served_and_lists_every_json_route(app_settings: Settings) -> None:
    with TestClient(create_app(app_settings), base_url="http://127.0.0.1") as client:
        served = client.get("/openapi.json")
    assert served.status_code == 200 and served.json() == document(app_routes())
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
