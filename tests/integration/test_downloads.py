"""Resumable, verifiable downloads over HTTP: ETag, Repr-Digest, Range, If-Range and 416.

Real PostgreSQL and the real API with local storage; every request is checked and audited.
"""

from __future__ import annotations

import base64
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
from shared.models import DownloadAttempt
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
    # Given a download that broke off after some bytes (the connection dropped mid-body)
    received = bytearray()
    with client.stream("GET", url, headers=bearer(population)) as response:
        assert response.status_code == 200
        etag = response.headers["etag"]
        for chunk in response.iter_bytes():
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
