"""Export requests, management and downloads over HTTP, against real PostgreSQL and storage.

Background exports are driven here by calling the runner directly (the worker process and
Kafka are covered by the end-to-end tests); everything else is the real API.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import create_app
from services.api.state import state_of
from shared.db import transaction
from shared.events import ExportRequested, decode
from shared.flags import set_flag
from shared.identity import (
    create_token,
    find_user,
    get_account,
    remove_membership,
    set_membership,
    upsert_user,
)
from shared.models import DownloadAttempt, ExportJob, OutboxMessage, Role
from shared.runner import ExportRunner, RunOutcome
from shared.settings import Settings
from tests.integration.reportdata import Population, populate
from tests.support.reports import guarded, report_rows

THRESHOLD = 200


#: What the module's app changes of the test settings (tests/integration/conftest.py).
APP_SETTINGS = {
    "export_async_threshold_rows": THRESHOLD,
    "export_max_active_per_user": 3,
    "export_max_rows": 100_000,
}


@pytest.fixture(scope="module")
def population(sessions: sessionmaker[Session]) -> Population:
    return populate(sessions, orders=1500)


@pytest.fixture(scope="module")
def runner(client: TestClient) -> ExportRunner:
    return state_of(client.app).runner  # type: ignore[arg-type]


def bearer(population: Population, who: str = "admin") -> dict[str, str]:
    return {"Authorization": f"Bearer {population.tokens[who]}"}


def post_export(
    client: TestClient,
    population: Population,
    filters: dict[str, Any],
    who: str = "admin",
    **kw: Any,
) -> Any:
    return client.post(
        "/api/v1/accounts/acme/order-exports",
        json={"filters": filters, **kw},
        headers=bearer(population, who),
    )


def download(client: TestClient, population: Population, url: str, who: str = "admin") -> Any:
    return client.get(url, headers=bearer(population, who))


def cancel_active(client: TestClient, population: Population, who: str = "admin") -> None:
    for export in client.get(
        "/api/v1/accounts/acme/order-exports", headers=bearer(population, who)
    ).json()["exports"]:
        if export["state"] in ("queued", "running"):
            client.post(
                f"/api/v1/order-exports/{export['id']}/cancel", headers=bearer(population, who)
            )


def test_small_export_is_made_in_the_request_and_equals_the_report(
    client: TestClient, population: Population
) -> None:
    filters = {"status": ["refunded"], "sort": "-total"}
    response = post_export(client, population, filters)
    assert response.status_code == 201
    export = response.json()["export"]
    assert export["state"] == "ready" and export["progress"]["percent"] == 100.0
    assert export["filters"]["status"] == ["refunded"] and export["filters"]["sort"] == "-total"
    assert export["download_url"].startswith("http://127.0.0.1/exports/")
    file = download(client, population, export["download_url"])
    assert file.status_code == 200
    assert file.headers["content-type"] == "text/csv; charset=utf-8"
    assert file.headers["cache-control"] == "no-store"
    assert file.headers["referrer-policy"] == "no-referrer"
    assert file.headers["x-content-type-options"] == "nosniff"
    assert file.headers["content-disposition"] == f'attachment; filename="{export["file"]["name"]}"'
    assert export["file"]["name"].startswith("orders-acme-") and export["file"]["name"].endswith(
        ".csv"
    )
    parsed = list(csv.reader(io.StringIO(file.content.decode("utf-8"), newline="")))
    expected = report_rows(client, filters, headers=bearer(population))
    assert parsed[0] == expected[0]
    assert parsed[1:] == [guarded(row) for row in expected[1:]]
    assert len(parsed) - 1 == export["row_count"] > 0
    assert export["file"]["size_bytes"] == len(file.content)


def test_a_background_export_request_reads_nothing_twice(
    client: TestClient, population: Population
) -> None:
    """The POST is the host app's write path: it reads the account once (not again by primary
    key once the job is inserted) and answers with the job it inserted (its server defaults come
    back with the INSERT), not one read again after the commit."""
    from sqlalchemy import event

    engine = client.app.state.api.engine  # type: ignore[attr-defined]
    statements: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", before)
    try:
        response = post_export(client, population, {"min_total": "0.01"})
    finally:
        event.remove(engine, "before_cursor_execute", before)
    assert response.status_code == 202, response.text
    export = response.json()["export"]
    assert export["state"] == "queued" and export["created_at"]
    inserted = next(i for i, s in enumerate(statements) if s.startswith("INSERT INTO export_jobs"))
    after = statements[inserted + 1 :]
    assert [s for s in after if s.startswith("SELECT") and "FROM accounts" in s] == [], after
    assert [s for s in after if s.startswith("SELECT") and "FROM export_jobs" in s] == [], after
    # And the answer is the export as stored, field for field
    stored = client.get(f"/api/v1/order-exports/{export['id']}", headers=bearer(population))
    assert stored.json()["export"] == export
    canceled = client.post(
        f"/api/v1/order-exports/{export['id']}/cancel", headers=bearer(population)
    )
    assert canceled.status_code == 202


def test_csv_edge_cases_round_trip(
    client: TestClient, population: Population, runner: ExportRunner
) -> None:
    response = post_export(client, population, {}, options={"utf8_bom": True})
    assert response.status_code == 202
    assert runner.run(uuid.UUID(response.json()["export"]["id"])).outcome is RunOutcome.READY
    export = client.get(
        f"/api/v1/order-exports/{response.json()['export']['id']}", headers=bearer(population)
    ).json()["export"]
    body = download(client, population, export["download_url"]).content
    assert body.startswith(b"\xef\xbb\xbf")
    rows = list(csv.reader(io.StringIO(body[3:].decode("utf-8"), newline="")))
    names = {row[2] for row in rows[1:]}
    assert "Line\nBreak Ltd" in names  # newline inside a quoted value
    assert 'Robert "Bobby" Tables' in names and "Smith, John" in names
    assert "Zoë Šimić" in names and "Emoji 🚀 Shop" in names
    assert '\'=HYPERLINK("http://evil.test","click")' in names and "'-Minus Corp" in names
    assert "'@handle" in names and "'\tTabbed Name" in names and "'+44 20 7946 0000" in names
    assert all(float(row[10]) >= 0 and "'" not in row[10] for row in rows[1:])  # numbers untouched
    dst = [row for row in rows if row[2] in ("Before DST", "After DST")]
    assert sorted(row[1] for row in dst) == ["2025-03-30 01:59", "2025-03-30 03:00"]


def test_large_export_is_queued_with_its_snapshot_and_outbox_event(
    client: TestClient,
    population: Population,
    sessions: sessionmaker[Session],
    runner: ExportRunner,
) -> None:
    # Given an admin asks for more rows than the in-request threshold
    response = post_export(client, population, {"channel": ["web", "pos"], "min_total": "0.00"})
    assert response.status_code == 202
    export = response.json()["export"]
    assert export["state"] == "queued" and export["download_url"] is None
    with sessions() as session:
        job = session.get_one(ExportJob, uuid.UUID(export["id"]))
        event = session.scalar(select(OutboxMessage).where(OutboxMessage.key == export["id"]))
        admin = find_user(session, "admin@acme.test")
    # Then the job holds the account, the user and the normalized filters
    assert (job.account_id, job.requested_by) == (
        population.account_id,
        admin.id if admin else None,
    )
    assert job.filters["channel"] == ["web", "pos"] and job.filters["min_total"] == "0"
    assert job.timezone == "Europe/Berlin" and job.column_set_version == 1
    assert event is not None and event.topic == "exports.requested"
    assert isinstance(decode(__import__("json").dumps(event.payload).encode()), ExportRequested)
    # When a worker runs it, the file holds exactly the rows matching the stored filters
    assert runner.run(job.id).outcome is RunOutcome.READY
    done = client.get(f"/api/v1/order-exports/{export['id']}", headers=bearer(population)).json()[
        "export"
    ]
    assert done["state"] == "ready" and done["row_count"] > THRESHOLD
    rows = list(
        csv.reader(io.StringIO(download(client, population, done["download_url"]).text, newline=""))
    )
    assert (
        len(rows) - 1
        == len(
            report_rows(
                client,
                headers=bearer(population),
                filters={"channel": ["web", "pos"], "min_total": "0"},
            )
        )
        - 1
    )


def test_filters_changed_after_the_click_do_not_change_the_job(
    client: TestClient,
    population: Population,
    sessions: sessionmaker[Session],
    runner: ExportRunner,
) -> None:
    clicked = {"status": ["paid"], "placed_from": "2025-01-01"}
    export = post_export(client, population, clicked).json()["export"]
    # The user then looks at other filters on screen (a report request with new filters)
    client.get(
        "/api/v1/accounts/acme/orders", params={"status": "pending"}, headers=bearer(population)
    )
    runner.run(uuid.UUID(export["id"]))
    done = client.get(f"/api/v1/order-exports/{export['id']}", headers=bearer(population)).json()[
        "export"
    ]
    rows = list(
        csv.reader(io.StringIO(download(client, population, done["download_url"]).text, newline=""))
    )
    assert {row[4] for row in rows[1:]} == {"paid"}
    assert len(rows) == len(report_rows(client, headers=bearer(population), filters=clicked))


def test_duplicates_and_idempotency_keys_return_the_existing_export(
    client: TestClient, population: Population
) -> None:
    cancel_active(client, population)
    first = post_export(client, population, {"channel": ["web"], "status": ["paid", "fulfilled"]})
    again = post_export(client, population, {"status": ["fulfilled", "paid"], "channel": "web"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["export"]["id"] == first.json()["export"]["id"]
    headers = {**bearer(population), "Idempotency-Key": "click-42"}
    keyed = client.post(
        "/api/v1/accounts/acme/order-exports",
        json={"filters": {"channel": ["phone"]}},
        headers=headers,
    )
    replay = client.post(
        "/api/v1/accounts/acme/order-exports",
        json={"filters": {"channel": ["phone"]}},
        headers=headers,
    )
    assert keyed.status_code in (201, 202) and replay.status_code == 200
    assert replay.json()["export"]["id"] == keyed.json()["export"]["id"]
    misuse = client.post(
        "/api/v1/accounts/acme/order-exports",
        json={"filters": {"channel": ["pos"]}},
        headers=headers,
    )
    assert misuse.status_code == 409
    cancel_active(client, population)


def test_active_export_cap_answers_429_with_retry_after(
    client: TestClient, population: Population
) -> None:
    cancel_active(client, population)
    for total in ("1", "2", "3"):
        assert post_export(client, population, {"min_total": total}).status_code == 202
    refused = post_export(client, population, {"min_total": "4"})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_active_exports"
    assert int(refused.headers["retry-after"]) > 0
    cancel_active(client, population)
    assert post_export(client, population, {"min_total": "4"}).status_code == 202
    cancel_active(client, population)


def test_too_many_rows_is_refused_not_truncated(
    app_settings: Settings, population: Population
) -> None:
    capped = app_settings.model_copy(update={"export_max_rows": 1400})
    with TestClient(create_app(capped), base_url="http://127.0.0.1") as client:
        response = post_export(client, population, {})
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "too_many_rows"
        assert post_export(client, population, {"channel": ["phone"]}).status_code in (201, 202)
        cancel_active(client, population)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"filters": {"status": ["nope"]}}, "status"),
        ({"filters": {"placed_from": "2025-02-30"}}, "placed_from"),
        ({"filters": {"surprise": 1}}, "surprise"),
        ({"filters": [], "options": {}}, "filters"),
        ({"filters": {}, "options": {"utf8_bom": "yes"}}, "options.utf8_bom"),
        ({"filters": {}, "options": {"zip": True}}, "options.zip"),
        ({"filters": {}, "extra": 1}, "extra"),
    ],
)
def test_bad_requests_are_422_and_create_nothing(
    client: TestClient,
    population: Population,
    sessions: sessionmaker[Session],
    body: dict[str, Any],
    field: str,
) -> None:
    with sessions() as session:
        before = session.scalar(text("SELECT count(*) FROM export_jobs"))
    response = client.post(
        "/api/v1/accounts/acme/order-exports", json=body, headers=bearer(population)
    )
    assert response.status_code == 422 and response.json()["error"]["field"] == field
    with sessions() as session:
        assert session.scalar(text("SELECT count(*) FROM export_jobs")) == before


def test_invalid_json_is_422(client: TestClient, population: Population) -> None:
    response = client.post(
        "/api/v1/accounts/acme/order-exports",
        content=b"{nope",
        headers={**bearer(population), "Content-Type": "application/json"},
    )
    assert response.status_code == 422 and response.json()["error"]["field"] == "body"


def test_request_permissions(client: TestClient, population: Population) -> None:
    assert post_export(client, population, {"status": ["paid"]}, who="member").status_code == 403
    assert post_export(client, population, {"status": ["paid"]}, who="outsider").status_code == 404
    assert client.post("/api/v1/accounts/acme/order-exports", json={}).status_code == 401
    assert (
        client.post(
            "/api/v1/accounts/nope/order-exports", json={}, headers=bearer(population)
        ).status_code
        == 404
    )


def test_export_detail_and_list_are_for_admins_of_the_account(
    client: TestClient, population: Population
) -> None:
    export = post_export(client, population, {"q": "ada"}).json()["export"]
    path = f"/api/v1/order-exports/{export['id']}"
    assert client.get(path, headers=bearer(population)).status_code == 200
    for who in ("member", "outsider"):
        assert client.get(path, headers=bearer(population, who)).status_code == 404
    assert (
        client.get("/api/v1/order-exports/not-a-uuid", headers=bearer(population)).status_code
        == 404
    )
    listing = client.get("/api/v1/accounts/acme/order-exports", headers=bearer(population)).json()[
        "exports"
    ]
    created = [e["created_at"] for e in listing]
    assert created == sorted(created, reverse=True) and export["id"] in {e["id"] for e in listing}
    assert (
        client.get(
            "/api/v1/accounts/acme/order-exports", headers=bearer(population, "member")
        ).status_code
        == 403
    )
    assert set(listing[0]) == {
        "id", "account", "state", "filters", "row_count", "progress", "attempts", "created_at",
        "started_at", "finished_at", "expires_at", "error", "download_url", "file", "verdict",
        "options", "deleted",
    }  # fmt: skip
    assert dt.datetime.fromisoformat(listing[0]["created_at"]).utcoffset() is not None


def test_cancel_and_retry_follow_the_state_machine(
    client: TestClient, population: Population, runner: ExportRunner
) -> None:
    cancel_active(client, population)
    export = post_export(client, population, {"min_total": "0.5", "channel": ["web"]}).json()[
        "export"
    ]
    assert export["state"] == "queued"
    assert (
        client.post(
            f"/api/v1/order-exports/{export['id']}/retry", headers=bearer(population)
        ).status_code
        == 409
    )
    canceled = client.post(
        f"/api/v1/order-exports/{export['id']}/cancel", headers=bearer(population)
    )
    assert canceled.status_code == 202 and canceled.json()["export"]["state"] == "canceled"
    assert (
        runner.run(uuid.UUID(export["id"])).outcome is RunOutcome.SKIPPED
    )  # a worker finds nothing to do
    retried = client.post(f"/api/v1/order-exports/{export['id']}/retry", headers=bearer(population))
    assert retried.status_code == 202 and retried.json()["export"]["state"] == "queued"
    assert runner.run(uuid.UUID(export["id"])).outcome is RunOutcome.READY
    again = client.post(f"/api/v1/order-exports/{export['id']}/cancel", headers=bearer(population))
    assert again.status_code == 409
    assert (
        client.post(
            f"/api/v1/order-exports/{export['id']}/retry", headers=bearer(population, "member")
        ).status_code
        == 404
    )


def test_cookie_authenticated_export_needs_csrf(
    client: TestClient, population: Population, sessions: sessionmaker[Session]
) -> None:
    with transaction(sessions) as session:
        upsert_user(session, email="admin@acme.test", password="correct horse battery")
    browser = TestClient(client.app, base_url="http://127.0.0.1")
    login = browser.post(
        "/login",
        data={"email": "admin@acme.test", "password": "correct horse battery"},
        headers={"Accept": "application/json"},
    )
    token = login.json()["csrf_token"]
    body = {"filters": {"status": ["canceled"], "channel": ["phone"]}}
    assert browser.post("/api/v1/accounts/acme/order-exports", json=body).status_code == 403
    ok = browser.post(
        "/api/v1/accounts/acme/order-exports", json=body, headers={"X-CSRF-Token": token}
    )
    assert ok.status_code in (201, 202)


@pytest.fixture(scope="module")
def ready(client: TestClient, population: Population) -> dict[str, Any]:
    """A small export made in the request: ready, with a download link for the admin."""
    response = post_export(client, population, {"status": ["canceled"], "sort": "number"})
    assert response.status_code == 201
    return response.json()["export"]  # type: ignore[no-any-return]


# --- options.compression ------------------------------------------------------------------------


def _ready(
    client: TestClient, population: Population, runner: ExportRunner, response: Any
) -> dict[str, Any]:
    export = response.json()["export"]
    if response.status_code == 202:
        assert runner.run(uuid.UUID(export["id"])).outcome is RunOutcome.READY
    return client.get(  # type: ignore[no-any-return]
        f"/api/v1/order-exports/{export['id']}", headers=bearer(population)
    ).json()["export"]


@pytest.mark.parametrize("bom", [False, True])
@pytest.mark.parametrize("filters", [{"status": ["refunded"]}, {"channel": ["web", "pos"]}])
def test_a_gzip_export_is_the_plain_csv_compressed(
    client: TestClient,
    population: Population,
    runner: ExportRunner,
    filters: dict[str, Any],
    bom: bool,
) -> None:
    """Inline (few rows) and background (many rows): the same bytes, gzip-compressed."""
    import gzip
    import hashlib

    cancel_active(client, population)
    plain = _ready(
        client,
        population,
        runner,
        post_export(client, population, filters, options={"utf8_bom": bom}),
    )
    packed = _ready(
        client,
        population,
        runner,
        post_export(client, population, filters, options={"utf8_bom": bom, "compression": "gzip"}),
    )
    assert packed["options"] == {"utf8_bom": bom, "compression": "gzip"}
    assert plain["options"] == {"utf8_bom": bom, "compression": "none"}
    assert packed["file"]["name"] == plain["file"]["name"] + ".gz"
    assert packed["file"]["name"].endswith(".csv.gz")
    plain_body = download(client, population, plain["download_url"]).content
    response = download(client, population, packed["download_url"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/gzip"
    assert response.headers["content-disposition"] == (
        f'attachment; filename="{packed["file"]["name"]}"'
    )
    stored = response.content
    # size, sha256 and ETag describe the stored (compressed) bytes
    assert packed["file"]["size_bytes"] == len(stored) < len(plain_body)
    assert packed["file"]["sha256"] == hashlib.sha256(stored).hexdigest()
    assert response.headers["etag"] == f'"{packed["file"]["sha256"]}"'
    # decompressed, byte-identical to the plain export of the same filters
    assert gzip.decompress(stored) == plain_body
    assert packed["row_count"] == plain["row_count"]


def test_an_unknown_compression_is_422_naming_the_option(
    client: TestClient, population: Population
) -> None:
    for value in ("zip", "GZIP", True, None, 1):
        response = post_export(client, population, {}, options={"compression": value})
        assert response.status_code == 422, value
        assert response.json()["error"]["field"] == "options.compression"


def test_the_duplicate_check_compares_filters_and_options(
    client: TestClient, population: Population
) -> None:
    cancel_active(client, population)
    filters = {"channel": ["web"], "status": ["paid", "fulfilled"]}
    plain = post_export(client, population, filters)
    packed = post_export(client, population, filters, options={"compression": "gzip"})
    bom = post_export(client, population, filters, options={"utf8_bom": True})
    assert (plain.status_code, packed.status_code, bom.status_code) == (202, 202, 202)
    ids = {r.json()["export"]["id"] for r in (plain, packed, bom)}
    assert len(ids) == 3
    again = post_export(client, population, filters, options={"compression": "gzip"})
    assert (
        again.status_code == 200 and again.json()["export"]["id"] == packed.json()["export"]["id"]
    )
    explicit = post_export(client, population, filters, options={"compression": "none"})
    assert explicit.status_code == 200
    assert explicit.json()["export"]["id"] == plain.json()["export"]["id"]
    cancel_active(client, population)


class TestDownloads:
    """The signed link: who may use it, when, and what is recorded."""

    def outcomes(self, sessions: sessionmaker[Session], export_id: str) -> list[str]:
        with sessions() as session:
            return list(
                session.scalars(
                    select(DownloadAttempt.outcome)
                    .where(DownloadAttempt.export_id == uuid.UUID(export_id))
                    .order_by(DownloadAttempt.id)
                )
            )

    def test_admin_downloads_and_it_is_audited(
        self,
        client: TestClient,
        population: Population,
        sessions: sessionmaker[Session],
        ready: dict[str, Any],
    ) -> None:
        assert download(client, population, ready["download_url"]).status_code == 200
        assert self.outcomes(sessions, ready["id"])[-1] == "ok"

    def test_without_credentials_401_or_login(
        self, client: TestClient, sessions: sessionmaker[Session], ready: dict[str, Any]
    ) -> None:
        anonymous = TestClient(client.app, base_url="http://127.0.0.1")
        assert anonymous.get(ready["download_url"]).status_code == 401
        browser = anonymous.get(
            ready["download_url"], headers={"Accept": "text/html"}, follow_redirects=False
        )
        assert browser.status_code == 303 and browser.headers["location"].startswith(
            "/login?next=%2Fexports%2F"
        )
        assert self.outcomes(sessions, ready["id"])[-1] == "unauthenticated"

    def test_member_403_outsider_404(
        self,
        client: TestClient,
        population: Population,
        sessions: sessionmaker[Session],
        ready: dict[str, Any],
    ) -> None:
        assert download(client, population, ready["download_url"], who="member").status_code == 403
        assert self.outcomes(sessions, ready["id"])[-1] == "forbidden"
        assert (
            download(client, population, ready["download_url"], who="outsider").status_code == 404
        )
        assert self.outcomes(sessions, ready["id"])[-1] == "not_found"

    def test_link_is_bound_to_its_recipient(
        self,
        client: TestClient,
        population: Population,
        sessions: sessionmaker[Session],
        ready: dict[str, Any],
    ) -> None:
        with transaction(sessions) as session:
            account = get_account(session, "acme")
            other = upsert_user(session, email="second-admin@acme.test", password="long-enough-pw")
            set_membership(session, account=account, user=other, role=Role.ADMIN)
            token = create_token(session, other)
        response = client.get(ready["download_url"], headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 403 and response.json()["error"]["code"] == "bad_signature"
        own = client.get(
            f"/api/v1/order-exports/{ready['id']}", headers={"Authorization": f"Bearer {token}"}
        ).json()
        assert (
            client.get(
                own["export"]["download_url"], headers={"Authorization": f"Bearer {token}"}
            ).status_code
            == 200
        )

    @pytest.mark.parametrize("part", ["expires", "signature", "export_id", "key_id"])
    def test_tampering_is_403(
        self,
        client: TestClient,
        population: Population,
        sessions: sessionmaker[Session],
        ready: dict[str, Any],
        part: str,
    ) -> None:
        url = urlsplit(ready["download_url"])
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        if part == "expires":
            query["expires"] = str(int(query["expires"]) + 3600)
        elif part == "signature":
            kid, mac = query["signature"].split(".")
            query["signature"] = f"{kid}.{mac[:-1]}{'0' if mac[-1] != '0' else '1'}"
        elif part == "key_id":
            query["signature"] = "zz." + query["signature"].split(".")[1]
        else:
            other = post_export(
                client, population, {"status": ["refunded"], "channel": ["web"]}
            ).json()["export"]
            path = f"/exports/{other['id']}/download"
        response = client.get(path, params=query, headers=bearer(population))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "bad_signature"

    @pytest.mark.parametrize(
        ("signed_with", "expires_in", "served_with", "status"),
        [
            (None, -5, None, 410),  # expired (None: the module app's own keys)
            ("old1:" + "o" * 32, 3600, "new2:" + "n" * 32 + ",old1:" + "o" * 32, 200),  # rotated
            ("old1:" + "o" * 32, 3600, "new2:" + "n" * 32, 403),  # the old key retired
        ],
    )
    def test_link_expiry_and_key_rotation(
        self,
        client: TestClient,
        population: Population,
        app_settings: Settings,
        ready: dict[str, Any],
        signed_with: str | None,
        expires_in: int,
        served_with: str | None,
        status: int,
    ) -> None:
        from shared.signing import SigningKeys, download_path

        with state_of(client.app).sessions() as session:  # type: ignore[arg-type]
            admin = find_user(session, "admin@acme.test")
        assert admin is not None
        signing = app_settings
        if signed_with is not None:
            signing = app_settings.model_copy(update={"download_signing_keys": signed_with})
        path = download_path(
            SigningKeys.from_settings(signing),
            export_id=ready["id"],
            user_id=admin.id,
            expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expires_in),
        )
        if served_with is None:
            response = client.get(path, headers=bearer(population))
        else:
            served = app_settings.model_copy(update={"download_signing_keys": served_with})
            with TestClient(create_app(served), base_url="http://127.0.0.1") as other:
                response = other.get(path, headers=bearer(population))
        assert response.status_code == status
        if status == 410:
            assert response.json()["error"]["code"] == "link_expired"

    def test_removed_admin_is_refused_even_with_the_emailed_link(
        self, client: TestClient, population: Population, sessions: sessionmaker[Session]
    ) -> None:
        with transaction(sessions) as session:
            account = get_account(session, "acme")
            leaver = upsert_user(session, email="leaver@acme.test", password="long-enough-pw")
            set_membership(session, account=account, user=leaver, role=Role.ADMIN)
            token = create_token(session, leaver)
        headers = {"Authorization": f"Bearer {token}"}
        export = client.post(
            "/api/v1/accounts/acme/order-exports",
            json={"filters": {"q": "turing"}},
            headers=headers,
        ).json()["export"]
        assert client.get(export["download_url"], headers=headers).status_code == 200
        with transaction(sessions) as session:
            leaver_user = find_user(session, "leaver@acme.test")
            assert leaver_user is not None
            remove_membership(session, account=get_account(session, "acme"), user=leaver_user)
        assert client.get(export["download_url"], headers=headers).status_code == 404
        with transaction(sessions) as session:
            set_membership(
                session, account=get_account(session, "acme"), user=leaver_user, role=Role.MEMBER
            )
        assert client.get(export["download_url"], headers=headers).status_code == 403

    def test_expired_file_is_410_and_switch_off_keeps_downloads(
        self,
        client: TestClient,
        population: Population,
        sessions: sessionmaker[Session],
        ready: dict[str, Any],
    ) -> None:
        with transaction(sessions) as session:
            set_flag(session, "exports_enabled", False)
        try:
            import time

            time.sleep(2.1)  # the flag cache lives 2 s
            refused = post_export(client, population, {"status": ["paid"], "q": "x"})
            assert (
                refused.status_code == 503 and refused.json()["error"]["code"] == "exports_disabled"
            )
            assert download(client, population, ready["download_url"]).status_code == 200
        finally:
            with transaction(sessions) as session:
                set_flag(session, "exports_enabled", True)
            state_of(client.app).flags.forget()  # no later test sees the switch off
        assert state_of(client.app).flags.get("exports_enabled")
        with transaction(sessions) as session:
            session.execute(
                update(ExportJob)
                .where(ExportJob.id == uuid.UUID(ready["id"]))
                .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
            )
        gone = download(client, population, ready["download_url"])
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "file_expired"
        assert (
            client.get(f"/api/v1/order-exports/{ready['id']}", headers=bearer(population)).json()[
                "export"
            ]["download_url"]
            is None
        )
        assert self.outcomes(sessions, ready["id"])[-1] == "file_expired"
