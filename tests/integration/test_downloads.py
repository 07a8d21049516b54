"""Resumable, verifiable downloads over HTTP: ETag, Repr-Digest, Range, If-Range and 416.

Real PostgreSQL and the real API with local storage; every request is checked and audited.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import create_app
from services.api.state import state_of
from shared.models import DownloadAttempt, ExportJob
from shared.settings import Settings
from tests.integration.reportdata import Population, populate


@pytest.fixture(scope="module")
def population(sessions: sessionmaker[Session]) -> Population:
    return populate(sessions, orders=600)


@pytest.fixture(scope="module")
def client(
    settings: Settings, population: Population, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    storage = Path(tmp_path_factory.mktemp("storage"))
    app_settings = settings.model_copy(
        update={"storage_url": storage.as_uri(), "export_async_threshold_rows": 10_000}
    )
    with TestClient(create_app(app_settings), base_url="http://127.0.0.1") as client:
        yield client


def bearer(population: Population, who: str = "admin") -> dict[str, str]:
    return {"Authorization": f"Bearer {population.tokens[who]}"}


@pytest.fixture(scope="module")
def export(client: TestClient, population: Population) -> dict[str, Any]:
    """A ready export made in the request (all orders: a file of some 100 kB)."""
    response = client.post(
        "/api/v1/accounts/acme/order-exports", json={"filters": {}}, headers=bearer(population)
    )
    assert response.status_code == 201
    return response.json()["export"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def whole(client: TestClient, population: Population, export: dict[str, Any]) -> bytes:
    response = client.get(export["download_url"], headers=bearer(population))
    assert response.status_code == 200
    return response.content


def get(
    client: TestClient, population: Population, url: str, who: str = "admin", **headers: str
) -> Any:
    return client.get(url, headers={**bearer(population, who), **headers})


def attempts(sessions: sessionmaker[Session], export_id: str) -> list[DownloadAttempt]:
    with sessions() as session:
        return list(
            session.scalars(
                select(DownloadAttempt)
                .where(DownloadAttempt.export_id == uuid.UUID(export_id))
                .order_by(DownloadAttempt.id)
            )
        )


def test_a_whole_download_says_how_to_verify_and_resume_it(
    client: TestClient, population: Population, export: dict[str, Any], whole: bytes
) -> None:
    response = get(client, population, export["download_url"])
    digest = hashlib.sha256(whole).digest()
    assert response.status_code == 200
    assert response.headers["accept-ranges"] == "bytes"
    assert (
        response.headers["content-length"] == str(len(whole)) == str(export["file"]["size_bytes"])
    )
    assert response.headers["etag"] == f'"{digest.hex()}"' == f'"{export["file"]["sha256"]}"'
    assert response.headers["repr-digest"] == f"sha-256=:{base64.b64encode(digest).decode()}:"
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    ("spec", "start", "end"),
    [("bytes=100-199", 100, 199), ("bytes=5000-", 5000, None), ("bytes=-300", None, None)],
)
def test_one_range_gets_exactly_those_bytes(
    client: TestClient,
    population: Population,
    export: dict[str, Any],
    whole: bytes,
    spec: str,
    start: int | None,
    end: int | None,
) -> None:
    size = len(whole)
    if start is None:  # a suffix: the last 300 bytes
        first, last = size - 300, size - 1
    else:
        first, last = start, size - 1 if end is None else end
    response = get(client, population, export["download_url"], Range=spec)
    assert response.status_code == 206
    assert response.content == whole[first : last + 1]
    assert response.headers["content-range"] == f"bytes {first}-{last}/{size}"
    assert response.headers["content-length"] == str(last - first + 1)
    assert response.headers["etag"] == f'"{export["file"]["sha256"]}"'


def test_a_range_past_the_end_is_cut_to_the_file(
    client: TestClient, population: Population, export: dict[str, Any], whole: bytes
) -> None:
    size = len(whole)
    response = get(
        client, population, export["download_url"], Range=f"bytes={size - 10}-{size * 2}"
    )
    assert response.status_code == 206
    assert response.content == whole[-10:]
    assert response.headers["content-range"] == f"bytes {size - 10}-{size - 1}/{size}"


@pytest.mark.parametrize("spec", ["bytes={size}-", "bytes={size}-{size2}", "bytes=-0"])
def test_an_unsatisfiable_range_is_416_with_the_size(
    client: TestClient, population: Population, export: dict[str, Any], whole: bytes, spec: str
) -> None:
    size = len(whole)
    header = spec.format(size=size, size2=size + 5)
    response = get(client, population, export["download_url"], Range=header)
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{size}"
    assert response.json()["error"]["code"] == "range_not_satisfiable"


def test_if_range_with_the_current_etag_resumes_and_any_other_value_restarts(
    client: TestClient, population: Population, export: dict[str, Any], whole: bytes
) -> None:
    etag = f'"{export["file"]["sha256"]}"'
    url = export["download_url"]
    same = get(client, population, url, Range="bytes=10-19", **{"If-Range": etag})
    assert (same.status_code, same.content) == (206, whole[10:20])
    for other in ('"0123"', f"W/{etag}", "Tue, 01 Dec 2026 10:00:00 GMT"):
        changed = get(client, population, url, Range="bytes=10-19", **{"If-Range": other})
        assert (changed.status_code, changed.content) == (200, whole)


@pytest.mark.parametrize("spec", ["bytes=0-9,20-29", "items=0-9", "bytes=9-1", "bytes=x-"])
def test_several_ranges_or_an_unreadable_range_get_the_whole_file(
    client: TestClient, population: Population, export: dict[str, Any], whole: bytes, spec: str
) -> None:
    response = get(client, population, export["download_url"], Range=spec)
    assert (response.status_code, response.content) == (200, whole)
    assert "content-range" not in response.headers


def test_ranged_requests_are_authorized_and_audited_like_any_other(
    client: TestClient,
    population: Population,
    sessions: sessionmaker[Session],
    export: dict[str, Any],
    whole: bytes,
) -> None:
    url = export["download_url"]
    before = len(attempts(sessions, export["id"]))
    assert get(client, population, url, "member", Range="bytes=0-9").status_code == 403
    assert get(client, population, url, "outsider", Range="bytes=0-9").status_code == 404
    assert get(client, population, url + "0", Range="bytes=0-9").status_code == 403
    assert get(client, population, url, Range="bytes=0-9").status_code == 206
    assert get(client, population, url).status_code == 200
    rows = attempts(sessions, export["id"])[before:]
    assert [r.outcome for r in rows] == ["forbidden", "not_found", "bad_signature", "ok", "ok"]
    assert [r.byte_range for r in rows] == [None, None, None, "0-9", None]
    assert not any(r.redirect for r in rows)


def test_an_interrupted_download_resumes_like_curl_c(
    client: TestClient, population: Population, export: dict[str, Any]
) -> None:
    """``curl -C -``: keep what arrived, ask for the rest with Range, check the join's sha256."""
    url = export["download_url"]
    # Given a download that broke off after some bytes (the client hung up mid-body)
    received = bytearray()
    with client.stream("GET", url, headers=bearer(population)) as response:
        assert response.status_code == 200
        etag = response.headers["etag"]
        for chunk in response.iter_bytes(chunk_size=4096):
            received += chunk
            if len(received) >= 40_000:
                break
    received = received[:40_000]
    # When the client asks for the rest, from the byte it has, if the file is still the same
    rest = get(client, population, url, Range=f"bytes={len(received)}-", **{"If-Range": etag})
    # Then it gets exactly the rest, and the joined file is the one the ETag names
    assert rest.status_code == 206
    assert rest.headers["content-range"].startswith(f"bytes {len(received)}-")
    joined = bytes(received) + rest.content
    assert f'"{hashlib.sha256(joined).hexdigest()}"' == etag
    assert len(joined) == export["file"]["size_bytes"]


# --- delete now --------------------------------------------------------------------------------


def fresh_export(client: TestClient, population: Population) -> dict[str, Any]:
    response = client.post(
        "/api/v1/accounts/acme/order-exports",
        json={"filters": {"status": ["paid"]}},
        headers=bearer(population),
    )
    assert response.status_code == 201
    return response.json()["export"]  # type: ignore[no-any-return]


def test_an_admin_deletes_the_file_now_and_every_link_then_answers_410(
    client: TestClient, population: Population, sessions: sessionmaker[Session]
) -> None:
    import json

    from shared.events import decode
    from shared.models import ExportTransition, OutboxMessage

    # Given a ready export whose file is stored
    export = fresh_export(client, population)
    storage = state_of(client.app).storage  # type: ignore[arg-type]
    with sessions() as session:
        key = session.get_one(ExportJob, uuid.UUID(export["id"])).storage_key
    assert key is not None and storage.exists(key)
    # When an admin deletes it
    response = client.delete(
        f"/api/v1/order-exports/{export['id']}/file", headers=bearer(population)
    )
    # Then the export is expired at once and says by whom; the object is gone
    assert response.status_code == 200
    deleted = response.json()["export"]
    assert deleted["state"] == "expired" and deleted["download_url"] is None
    assert deleted["deleted"]["by"] == "admin" and deleted["deleted"]["at"]
    assert not storage.exists(key)
    assert get(client, population, export["download_url"]).status_code == 410
    with sessions() as session:
        history = session.scalars(
            select(ExportTransition)
            .where(ExportTransition.export_id == uuid.UUID(export["id"]))
            .order_by(ExportTransition.id.desc())
        ).first()
        events = [
            decode(json.dumps(m.payload).encode())
            for m in session.scalars(select(OutboxMessage).where(OutboxMessage.key == export["id"]))
        ]
        admin_id = session.get_one(ExportJob, uuid.UUID(export["id"])).requested_by
    assert history is not None
    assert (history.to_state, history.detail, history.actor) == (
        "expired",
        "deleted",
        f"user:{admin_id}",
    )
    expired = [e for e in events if type(e).__name__ == "ExportExpired"]
    assert [(e.reason, e.deleted_by) for e in expired] == [("deleted", admin_id)]  # type: ignore[attr-defined]
    # And a second delete is a conflict: there is no file any more
    again = client.delete(f"/api/v1/order-exports/{export['id']}/file", headers=bearer(population))
    assert again.status_code == 409


def test_only_admins_of_the_account_delete_files(
    client: TestClient, population: Population
) -> None:
    export = fresh_export(client, population)
    url = f"/api/v1/order-exports/{export['id']}/file"
    assert client.delete(url, headers=bearer(population, "member")).status_code == 403
    assert client.delete(url, headers=bearer(population, "outsider")).status_code == 404
    assert client.delete(url).status_code == 401
    assert get(client, population, export["download_url"]).status_code == 200


def test_a_cookie_caller_needs_the_csrf_token_to_delete(
    client: TestClient, population: Population
) -> None:
    export = fresh_export(client, population)
    browser = TestClient(client.app, base_url="http://127.0.0.1")
    login = browser.post(
        "/login", data={"email": "admin@acme.test", "password": "correct horse battery"}
    )
    assert login.status_code == 200
    url = f"/api/v1/order-exports/{export['id']}/file"
    assert browser.delete(url).status_code == 403
    assert browser.delete(url, headers={"X-CSRF-Token": "forged"}).status_code == 403
    page = browser.get(f"/exports/{export['id']}", headers={"Accept": "text/html"}).text
    csrf = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    assert browser.delete(url, headers={"X-CSRF-Token": csrf}).status_code == 200


# --- download audit ---------------------------------------------------------------------------


def test_admins_see_who_downloaded_newest_first(
    client: TestClient, population: Population, sessions: sessionmaker[Session]
) -> None:
    export = fresh_export(client, population)
    url = export["download_url"]
    assert get(client, population, url, Range="bytes=0-99").status_code == 206
    assert get(client, population, url, "member").status_code == 403
    assert get(client, population, url).status_code == 200
    response = client.get(
        f"/api/v1/order-exports/{export['id']}/downloads", headers=bearer(population)
    )
    assert response.status_code == 200
    rows = response.json()["downloads"]
    assert [(r["outcome"], r["bytes"], r["redirect"]) for r in rows] == [
        ("ok", None, False),
        ("forbidden", None, False),
        ("ok", "0-99", False),
    ]
    assert [r["user"]["email"] for r in rows] == [
        "admin@acme.test",
        "member@acme.test",
        "admin@acme.test",
    ]
    assert all(isinstance(r["user"]["id"], int) for r in rows)
    assert all(r["client_ip"] == "testclient" for r in rows)
    moments = [dt.datetime.fromisoformat(r["at"]) for r in rows]
    assert all(m.tzinfo is not None for m in moments) and moments == sorted(moments, reverse=True)


def test_the_download_audit_is_for_admins_of_the_account(
    client: TestClient, population: Population, export: dict[str, Any]
) -> None:
    url = f"/api/v1/order-exports/{export['id']}/downloads"
    assert client.get(url, headers=bearer(population, "member")).status_code == 403
    assert client.get(url, headers=bearer(population, "outsider")).status_code == 404
    assert client.get(url).status_code == 401
    unknown = f"/api/v1/order-exports/{uuid.uuid4()}/downloads"
    assert client.get(unknown, headers=bearer(population)).status_code == 404


def test_the_download_audit_lists_at_most_500_and_keeps_anonymous_attempts(
    client: TestClient, population: Population, sessions: sessionmaker[Session]
) -> None:
    export = fresh_export(client, population)
    with sessions() as session, session.begin():
        session.add_all(
            DownloadAttempt(export_id=uuid.UUID(export["id"]), user_id=None, outcome="ok")
            for _ in range(510)
        )
    assert client.get(export["download_url"]).status_code == 401  # no caller: user null
    rows = client.get(
        f"/api/v1/order-exports/{export['id']}/downloads", headers=bearer(population)
    ).json()["downloads"]
    assert len(rows) == 500
    assert rows[0]["outcome"] == "unauthenticated" and rows[0]["user"] is None


def test_redirect_mode_with_local_storage_still_streams(
    settings: Settings, population: Population, tmp_path: Path
) -> None:
    app_settings = settings.model_copy(
        update={"storage_url": tmp_path.as_uri(), "export_download_redirect_seconds": 60}
    )
    with TestClient(create_app(app_settings), base_url="http://127.0.0.1") as local:
        export = fresh_export(local, population)
        response = get(local, population, export["download_url"], Range="bytes=0-9")
    assert response.status_code == 206 and len(response.content) == 10
