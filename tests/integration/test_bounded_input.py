"""Bounded input over HTTP against real PostgreSQL: body caps enforced while reading,
authentication before any body is parsed, and hostile numbers, cursors, nesting and link
parameters answered with the contract's 4xx (never a 5xx), also under property tests."""

from __future__ import annotations

import base64
import concurrent.futures
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import create_app
from services.api.state import state_of
from shared.filters import FILTER_NAMES
from tests.integration.reportdata import Population, populate, report_answer

FUZZ = hypothesis_settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
#: A small cap so the tests send small bodies.
CAP = 2048


#: What the module's app changes of the test settings (tests/integration/conftest.py).
APP_SETTINGS = {
    "export_max_active_per_user": 1000,
    "export_max_inline_per_minute": 100_000,
    "max_request_body_bytes": CAP,
}


@pytest.fixture(scope="module")
def population(sessions: sessionmaker[Session]) -> Population:
    return populate(sessions, orders=50)


def bearer(population: Population) -> dict[str, str]:
    return {"Authorization": f"Bearer {population.tokens['admin']}"}


EXPORTS = "/api/v1/accounts/acme/order-exports"
JSON = {"Content-Type": "application/json"}


def assert_body_too_large(response: Any) -> None:
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "body_too_large"


# -- body size ------------------------------------------------------------------------------


def test_a_body_over_the_cap_is_413(client: TestClient, population: Population) -> None:
    body = json.dumps({"filters": {"q": "x" * (CAP * 2)}})
    assert_body_too_large(
        client.post(EXPORTS, content=body, headers={**bearer(population), **JSON})
    )


def test_a_lying_or_missing_content_length_is_caught_while_reading(
    client: TestClient, population: Population
) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length at all
        for _ in range(8):
            yield b"x" * 1024

    assert_body_too_large(client.post(EXPORTS, content=chunks(), headers=bearer(population)))
    # Content-Length claims 10 bytes; the body is bigger. Sent as a raw ASGI request.
    parts = [b"{" + b" " * 1024 for _ in range(4)]

    async def receive() -> dict[str, Any]:
        if parts:
            return {"type": "http.request", "body": parts.pop(), "more_body": bool(parts)}
        return {"type": "http.disconnect"}

    headers = {
        "content-length": "10",
        "content-type": "application/json",
        "authorization": bearer(population)["Authorization"],
    }
    sent = raw_request(client.app, "POST", EXPORTS, headers, receive)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 413
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert json.loads(body)["error"]["code"] == "body_too_large"


def test_login_and_form_bodies_are_capped_too(client: TestClient) -> None:
    assert_body_too_large(
        client.post("/login", data={"email": "a@b.test", "password": "p" * (CAP * 2)})
    )


def test_unauthenticated_bodies_are_not_parsed(client: TestClient) -> None:
    # Authentication comes first: not even the JSON syntax of an anonymous body is looked at.
    response = client.post(
        EXPORTS, content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 401, response.text
    response = client.post("/accounts/acme/exports", content=b"status=paid", follow_redirects=False)
    assert response.status_code in (401, 303), response.text


def raw_request(
    app: Any,
    method: str,
    path: str,
    headers: dict[str, str],
    receive: Callable[[], Awaitable[dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Run one raw ASGI request (the body is whatever ``receive`` hands out); what the app sent."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1")]
        + [(name.encode(), value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }
    # A thread of its own: the browser tests' Playwright may own this thread's event loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(anyio.run, app, scope, receive, send).result()
    return sent


def _anonymous_write(app: Any, method: str, path: str) -> tuple[int, int]:
    """A raw ASGI ``method path`` with a form body and no credentials: (status, how many times
    the app asked for the body)."""
    asked = 0

    async def receive() -> dict[str, Any]:
        nonlocal asked
        asked += 1
        return {"type": "http.request", "body": b"next=%2F&csrf_token=x", "more_body": False}

    form = {"content-length": "21", "content-type": "application/x-www-form-urlencoded"}
    sent = raw_request(app, method, path, form, receive)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], asked


EXPORT_ID = "00000000-0000-0000-0000-000000000001"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", EXPORTS),
        ("POST", f"/api/v1/order-exports/{EXPORT_ID}/retry"),
        ("POST", f"/api/v1/order-exports/{EXPORT_ID}/cancel"),
        ("DELETE", f"/api/v1/order-exports/{EXPORT_ID}/file"),
        ("POST", "/accounts/acme/exports"),
        ("POST", f"/exports/{EXPORT_ID}/retry"),
        ("POST", f"/exports/{EXPORT_ID}/cancel"),
        ("POST", f"/exports/{EXPORT_ID}/delete-file"),
    ],
)
def test_an_anonymous_write_is_answered_with_its_body_unread(
    client: TestClient, method: str, path: str
) -> None:
    status, asked = _anonymous_write(client.app, method, path)
    assert status in (401, 303), status  # the API's 401; a page's form sends a browser to login
    assert asked == 0, f"{method} {path} read the body of an anonymous request"


# -- numbers, nesting, cursors, link parameters ---------------------------------------------


def test_deeply_nested_json_is_422(client: TestClient, population: Population) -> None:
    response = client.post(
        EXPORTS,
        content=b"[" * 1000 + b"]" * 1000,
        headers={**bearer(population), **JSON},
    )
    assert response.status_code == 422, response.text
    settings = state_of(client.app).settings.model_copy(  # type: ignore[arg-type]
        update={"max_request_body_bytes": 65536}
    )
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as roomy:
        response = roomy.post(
            EXPORTS,
            content=b"[" * 50_000,
            headers={**bearer(population), **JSON},
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "body"


@pytest.mark.parametrize(
    "amount",
    [
        "1e-20000",
        "1e-5",
        "1E+3",
        "0.001",
        "12345678901",
        "99999999999.99",
        "\uff11\uff12",
        "²",
        "1_000",
    ],
)
@pytest.mark.parametrize("field", ["min_total", "max_total"])
def test_money_amounts_a_total_cannot_have_are_422(
    client: TestClient, population: Population, field: str, amount: str
) -> None:
    report = client.get(
        "/api/v1/accounts/acme/orders", params={field: amount}, headers=bearer(population)
    )
    assert report.status_code == 422, report.text
    assert report.json()["error"]["field"] == field
    export = client.post(EXPORTS, json={"filters": {field: amount}}, headers=bearer(population))
    assert export.status_code == 422, export.text
    assert export.json()["error"]["field"] == field


def test_json_number_totals_with_exponents_are_422(
    client: TestClient, population: Population
) -> None:
    for raw in (b"1e-20000", b"1e400", b"0.000001", b"123456789012345678901234567890"):
        body = b'{"filters": {"min_total": ' + raw + b"}}"
        response = client.post(EXPORTS, content=body, headers={**bearer(population), **JSON})
        assert response.status_code == 422, (raw, response.text)
        assert response.json()["error"]["field"] == "min_total"


def test_plain_money_amounts_still_work(client: TestClient, population: Population) -> None:
    for amount in ("0", "12.5", "12.50", "-3.10", "9999999999.99", "5.000"):
        response = client.get(
            "/api/v1/accounts/acme/orders",
            params={"min_total": amount, "limit": 1},
            headers=bearer(population),
        )
        assert response.status_code == 200, (amount, response.text)


def cursor_of(*parts: object) -> str:
    raw = json.dumps(list(parts)).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    ("sort", "cursor"),
    [
        ("-placed_at", cursor_of("-placed_at", "2025-01-01T00:00:00+00:00", 2**70)),
        ("-placed_at", cursor_of("-placed_at", "2025-01-01T00:00:00+00:00", -(2**70))),
        ("total", cursor_of("total", "1e-20000", 1)),
        ("total", cursor_of("total", "1e400", 1)),
        ("-total", cursor_of("-total", "123456789012345.5", 1)),
        ("number", cursor_of("number", "A\x00B", 1)),
    ],
)
def test_out_of_range_cursors_are_422(
    client: TestClient, population: Population, sort: str, cursor: str
) -> None:
    response = client.get(
        "/api/v1/accounts/acme/orders",
        params={"sort": sort, "cursor": cursor},
        headers=bearer(population),
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "cursor"


@pytest.mark.parametrize("expires", ["²", "\uff11\uff12\uff13", "\u0663" * 10, "-1", "1e9"])
def test_download_links_with_odd_expiry_digits_are_403(
    client: TestClient, population: Population, expires: str
) -> None:
    made = client.post(EXPORTS, json={"filters": {"q": "odd-expiry"}}, headers=bearer(population))
    assert made.status_code == 201, made.text
    export_id = made.json()["export"]["id"]
    response = client.get(
        f"/exports/{export_id}/download",
        params={"expires": expires, "signature": "k0." + "0" * 64},
        headers=bearer(population),
    )
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "bad_signature"


# -- property tests: never a 5xx ------------------------------------------------------------

unicode_digits = st.text(
    st.characters(whitelist_categories=("Nd", "No", "Nl")), min_size=1, max_size=12
)
exponents = st.builds(
    lambda mantissa, exponent: f"{mantissa}e{exponent}",
    st.integers(-(10**6), 10**6),
    st.integers(-(10**6), 10**6),
)
huge_numbers = st.integers(-(10**60), 10**60).map(str) | st.decimals(places=30).map(str)
number_text = unicode_digits | exponents | huge_numbers | st.floats().map(repr)


def nested(depth: int, opener: str = "[") -> bytes:
    closer = {"[": "]", "{": "}"}[opener]
    if opener == "[":
        return (opener * depth + closer * depth).encode()
    return ('{"a":' * depth + "1" + closer * depth).encode()


def assert_no_server_error(response: Any) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400 and response.url.path.startswith("/api/"):
        assert set(response.json()) == {"error"}


@FUZZ
@given(
    params=st.lists(
        st.tuples(st.sampled_from([*FILTER_NAMES, "limit", "cursor"]), number_text), max_size=4
    )
)
@example(params=[("min_total", "1e-20000")])
@example(params=[("max_total", "٣")])
@example(params=[("limit", "²")])
@example(params=[("cursor", cursor_of("-placed_at", "2025-01-01T00:00:00+00:00", 2**64))])
def test_report_never_fails_on_odd_numbers(
    client: TestClient, population: Population, params: list[tuple[str, str]]
) -> None:
    response = report_answer(client, population, params)
    assert_no_server_error(response)


@FUZZ
@given(
    filters=st.dictionaries(
        st.sampled_from(FILTER_NAMES),
        number_text | st.integers(-(10**40), 10**40) | st.floats(allow_nan=False),
        max_size=3,
    )
)
def test_export_requests_never_fail_on_odd_numbers(
    client: TestClient, population: Population, filters: dict[str, object]
) -> None:
    try:
        body = json.dumps({"filters": filters}).encode()
    except ValueError:
        return
    response = client.post(EXPORTS, content=body, headers={**bearer(population), **JSON})
    assert response.status_code in (200, 201, 202, 422), response.text
    assert_no_server_error(response)


JSON_ENDPOINTS = [
    ("POST", EXPORTS),
    ("POST", "/api/v1/order-exports/00000000-0000-0000-0000-000000000000/retry"),
    ("POST", "/api/v1/order-exports/00000000-0000-0000-0000-000000000000/cancel"),
    ("POST", "/login"),
]


@FUZZ
@given(
    endpoint=st.sampled_from(JSON_ENDPOINTS),
    depth=st.integers(1, 5000),
    opener=st.sampled_from(["[", "{"]),
)
@example(endpoint=JSON_ENDPOINTS[0], depth=1000, opener="[")
def test_deep_nesting_never_fails_on_any_json_endpoint(
    client: TestClient,
    population: Population,
    endpoint: tuple[str, str],
    depth: int,
    opener: str,
) -> None:
    method, path = endpoint
    response = client.request(
        method,
        path,
        content=nested(depth, opener),
        headers={**bearer(population), **JSON},
    )
    assert_no_server_error(response)
