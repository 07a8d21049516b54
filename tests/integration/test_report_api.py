"""The orders report over HTTP against real PostgreSQL: filters, sorts, paging, errors, access."""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import create_app
from shared.settings import Settings
from tests.integration.reportdata import TIMEZONE, Population, expected_rows, load_orders, populate


@pytest.fixture(scope="module")
def population(sessions: sessionmaker[Session]) -> Population:
    return populate(sessions)


@pytest.fixture(scope="module")
def client(settings: Settings, population: Population) -> Iterator[TestClient]:
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        yield client


@pytest.fixture(scope="module")
def raw_rows(settings: Settings, population: Population) -> list[dict[str, Any]]:
    return load_orders(settings.database_url, population.account_id)


def bearer(population: Population, who: str = "admin") -> dict[str, str]:
    return {"Authorization": f"Bearer {population.tokens[who]}"}


def all_pages(
    client: TestClient, headers: dict[str, str], params: dict[str, Any], limit: int = 400
) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    cursor = None
    for _ in range(100):
        query = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        response = client.get("/api/v1/accounts/acme/orders", params=query, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["rows"]) <= limit
        rows.extend(body["rows"])
        cursor = body["next_cursor"]
        if cursor is None:
            return rows
    raise AssertionError("pagination did not end")


CASES = [
    pytest.param({}, id="no-filters-default-sort"),
    pytest.param({"status": ["refunded"]}, id="status-one"),
    pytest.param({"status": ["pending", "canceled"]}, id="status-many"),
    pytest.param({"channel": ["phone"]}, id="channel-one"),
    pytest.param({"channel": ["pos", "marketplace"], "status": ["paid"]}, id="channel-and-status"),
    pytest.param({"placed_from": "2025-03-30", "placed_to": "2025-03-30"}, id="dst-day"),
    pytest.param({"placed_from": "2026-06-01"}, id="placed-from"),
    pytest.param({"placed_to": "2025-02-01"}, id="placed-to"),
    pytest.param({"q": "lovelace"}, id="q-name-case-insensitive"),
    pytest.param({"q": "A-0001"}, id="q-number"),
    pytest.param({"q": "+ORDERS"}, id="q-email"),
    pytest.param({"q": "100% pure_"}, id="q-like-metacharacters"),
    pytest.param({"min_total": "500"}, id="min-total"),
    pytest.param({"max_total": "120.5"}, id="max-total"),
    pytest.param({"min_total": "5", "max_total": "5.00"}, id="total-equal-bounds"),
    pytest.param({"sort": "placed_at"}, id="sort-placed-at"),
    pytest.param({"sort": "-total"}, id="sort-total-desc"),
    pytest.param({"sort": "total"}, id="sort-total-asc"),
    pytest.param({"sort": "number"}, id="sort-number"),
    pytest.param({"sort": "-number", "status": ["paid"]}, id="sort-number-desc"),
]


@pytest.mark.parametrize("params", CASES)
def test_filters_and_sorts_match_an_independent_computation(
    client: TestClient,
    population: Population,
    raw_rows: list[dict[str, Any]],
    params: dict[str, Any],
) -> None:
    # Given the raw orders of the account, filtered and sorted in Python
    expected = expected_rows(raw_rows, params, TIMEZONE)
    # When the report is read page by page through the API
    actual = all_pages(client, bearer(population), params)
    # Then every row, value and position agrees
    assert actual == expected
    assert expected or params.get("placed_to") == "2025-02-01", "case should select rows"


def test_dst_day_is_cut_at_local_midnight(client: TestClient, population: Population) -> None:
    rows = all_pages(
        client,
        bearer(population),
        {"placed_from": "2025-03-30", "placed_to": "2025-03-30", "q": "DST"},
    )
    # 00:59 UTC is 01:59 CET, 01:00 UTC is 03:00 CEST (the clock jumps): both on the 30th.
    assert [(r["customer_name"], r["placed_at"]) for r in rows] == [
        ("After DST", "2025-03-30 03:00"),
        ("Before DST", "2025-03-30 01:59"),
    ]
    edge = all_pages(
        client,
        bearer(population),
        {"placed_from": "2025-03-30", "placed_to": "2025-03-30", "q": "midnight"},
    )
    assert [r["placed_at"] for r in edge] == ["2025-03-30 00:00"]
    assert (
        all_pages(client, bearer(population), {"placed_from": "2025-03-30", "q": "just before"})
        == []
    )


def test_response_shape_and_page_size(client: TestClient, population: Population) -> None:
    response = client.get("/api/v1/accounts/acme/orders", headers=bearer(population))
    body = response.json()
    assert response.headers["content-type"].startswith("application/json")
    assert len(body["rows"]) == 100  # default page
    assert body["columns"][1] == {"key": "placed_at", "label": f"Placed at ({TIMEZONE})"}
    assert list(body["rows"][0]) == [c["key"] for c in body["columns"]]
    assert isinstance(body["next_cursor"], str)


def test_sql_looking_q_is_just_text(
    client: TestClient, population: Population, raw_rows: list[dict[str, Any]]
) -> None:
    rows = all_pages(client, bearer(population), {"q": "'); DROP TABLE orders;--"})
    assert [r["customer_name"] for r in rows] == ["Robert'); DROP TABLE orders;--"]
    assert len(all_pages(client, bearer(population), {})) == len(raw_rows)  # table still there


def test_other_accounts_rows_never_appear(
    client: TestClient, population: Population, raw_rows: list[dict[str, Any]]
) -> None:
    numbers = {r["number"] for r in all_pages(client, bearer(population), {})}
    assert numbers == {r["number"] for r in raw_rows}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=shipped", "status"),
        ("channel=fax", "channel"),
        ("placed_from=2025-02-30", "placed_from"),
        ("placed_to=yesterday", "placed_to"),
        ("placed_from=2025-05-02&placed_to=2025-05-01", "placed_from"),
        ("colour=red", "colour"),
        ("min_total=abc", "min_total"),
        ("max_total=1%2C5", "max_total"),
        ("q=" + "x" * 201, "q"),
        ("sort=customer_name", "sort"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("cursor=not-a-cursor", "cursor"),
    ],
)
def test_bad_input_is_422_naming_the_field(
    client: TestClient, population: Population, query: str, field: str
) -> None:
    response = client.get(f"/api/v1/accounts/acme/orders?{query}", headers=bearer(population))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["field"] == field
    assert field in error["message"]


def test_cursor_of_another_sort_is_refused(client: TestClient, population: Population) -> None:
    first = client.get(
        "/api/v1/accounts/acme/orders?sort=total&limit=5", headers=bearer(population)
    ).json()
    response = client.get(
        "/api/v1/accounts/acme/orders",
        params={"sort": "number", "cursor": first["next_cursor"]},
        headers=bearer(population),
    )
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "cursor"


@pytest.mark.parametrize("who", ["admin", "member"])
def test_members_and_admins_may_read(client: TestClient, population: Population, who: str) -> None:
    assert (
        client.get(
            "/api/v1/accounts/acme/orders?limit=1", headers=bearer(population, who)
        ).status_code
        == 200
    )


def test_non_members_and_unknown_accounts_get_404(
    client: TestClient, population: Population
) -> None:
    for path in ("/api/v1/accounts/acme/orders", "/api/v1/accounts/nope/orders"):
        response = client.get(path, headers=bearer(population, "outsider"))
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_missing_or_bad_auth_is_401_json_or_login_redirect(client: TestClient) -> None:
    anonymous = TestClient(client.app, base_url="http://127.0.0.1")
    response = anonymous.get("/api/v1/accounts/acme/orders")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    bad = anonymous.get(
        "/api/v1/accounts/acme/orders", headers={"Authorization": "Bearer oex_forged"}
    )
    assert bad.status_code == 401
    page = anonymous.get("/accounts/acme/orders?status=paid", follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=%2Faccounts%2Facme%2Forders%3Fstatus%3Dpaid"


def test_validation_happens_after_authentication(client: TestClient) -> None:
    anonymous = TestClient(client.app, base_url="http://127.0.0.1")
    assert anonymous.get("/api/v1/accounts/acme/orders?status=bogus").status_code == 401


class TableParser(HTMLParser):
    """Collects the report table's header labels and cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None
        self._in_table = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table" and ("class", "report") in attrs:
            self._in_table = True
        elif self._in_table and tag == "tr":
            self.rows.append([])
        elif self._in_table and tag in ("th", "td"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_table = False
        elif tag in ("th", "td") and self._cell is not None:
            text = "".join(self._cell)
            if tag == "th":
                self.headers.append(text.strip().rstrip(" ↑↓"))
            else:
                self.rows[-1].append(text)
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "50"},
        {"status": ["paid", "refunded"], "sort": "-total", "limit": "80"},
        {
            "q": "a",
            "channel": ["web"],
            "placed_from": "2025-06-01",
            "sort": "number",
            "limit": "60",
        },
    ],
)
def test_html_page_shows_the_same_columns_and_values_as_json(
    client: TestClient, population: Population, params: dict[str, Any]
) -> None:
    api = client.get(
        "/api/v1/accounts/acme/orders", params=params, headers=bearer(population)
    ).json()
    page = client.get("/accounts/acme/orders", params=params, headers=bearer(population))
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    table = TableParser()
    table.feed(page.text)
    assert table.headers == [c["label"] for c in api["columns"]]
    body_rows = [r for r in table.rows if r]
    assert body_rows == [[row[c["key"]] for c in api["columns"]] for row in api["rows"]]
    assert len(body_rows) == int(params["limit"])


def test_html_page_with_bad_filter_explains_it(client: TestClient, population: Population) -> None:
    page = client.get("/accounts/acme/orders?min_total=lots", headers=bearer(population))
    assert page.status_code == 422
    assert "Invalid filter" in page.text and "min_total" in page.text


def test_html_page_pagination_links_keep_the_filters(
    client: TestClient, population: Population
) -> None:
    page = client.get("/accounts/acme/orders?status=paid&limit=10", headers=bearer(population))
    assert 'rel="next"' in page.text
    link = page.text.split('rel="next" href="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
    assert "status=paid" in link and "limit=10" in link and "cursor=" in link
    second = client.get("/accounts/acme/orders" + link, headers=bearer(population))
    assert second.status_code == 200
