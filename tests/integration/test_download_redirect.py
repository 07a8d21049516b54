"""Downloads from S3 storage: ranged reads through the API, and redirect mode.

The real API over real PostgreSQL, with the S3 test server (moto, presigned expiry enforced as
S3 and MinIO do). With EXPORT_DOWNLOAD_REDIRECT_SECONDS the API checks everything, audits, then
answers 302 to a presigned GET and never carries the bytes.
"""

from __future__ import annotations

import gzip
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.error import HTTPError
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import create_app
from shared.models import DownloadAttempt
from shared.settings import Settings
from tests.integration.reportdata import Population, populate
from tests.integration.s3server import S3TestServer

#: Validity of the presigned URLs in these tests (seconds).
REDIRECT_SECONDS = 2


@pytest.fixture(scope="module")
def population(sessions: sessionmaker[Session]) -> Population:
    return populate(sessions, orders=600)


def _app_settings(settings: Settings, server: S3TestServer, *, redirect: int) -> Settings:
    bucket = f"exports-{uuid.uuid4().hex[:12]}"
    return settings.model_copy(
        update={
            "storage_url": f"s3://AKIDTEST:SECRETTEST@{server.endpoint}/{bucket}?region=us-east-1",
            "storage_part_size_mib": 5,
            "export_async_threshold_rows": 10_000,
            "export_download_redirect_seconds": redirect,
        }
    )


@pytest.fixture(scope="module")
def streaming(
    settings: Settings, population: Population, s3_server: S3TestServer
) -> Iterator[TestClient]:
    app = create_app(_app_settings(settings, s3_server, redirect=0))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


@pytest.fixture(scope="module")
def redirecting(
    settings: Settings, population: Population, s3_server: S3TestServer
) -> Iterator[TestClient]:
    app = create_app(_app_settings(settings, s3_server, redirect=REDIRECT_SECONDS))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


def bearer(population: Population, who: str = "admin") -> dict[str, str]:
    return {"Authorization": f"Bearer {population.tokens[who]}"}


def make_export(client: TestClient, population: Population, **options: Any) -> dict[str, Any]:
    response = client.post(
        "/api/v1/accounts/acme/order-exports",
        json={"filters": {}, "options": options},
        headers=bearer(population),
    )
    assert response.status_code == 201, response.text
    return response.json()["export"]  # type: ignore[no-any-return]


def fetch(url: str, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    """GET ``url`` straight from the storage server (as a browser following the 302 does)."""
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 (loopback test server)
    try:
        with urllib.request.urlopen(request) as response:  # noqa: S310
            return (
                response.status,
                response.read(),
                {k.lower(): v for k, v in response.headers.items()},
            )
    except HTTPError as exc:
        with exc:
            return exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()}


def test_ranged_downloads_from_s3_are_ranged_gets(
    streaming: TestClient, population: Population, s3_server: S3TestServer
) -> None:
    export = make_export(streaming, population)
    whole = streaming.get(export["download_url"], headers=bearer(population))
    assert whole.status_code == 200 and len(whole.content) == export["file"]["size_bytes"]
    before = len(s3_server.front.requests)
    part = streaming.get(
        export["download_url"], headers={**bearer(population), "Range": "bytes=1000-1999"}
    )
    assert part.status_code == 206 and part.content == whole.content[1000:2000]
    gets = [r for r in s3_server.front.requests[before:] if r[0] == "GET"]
    assert [r[2] for r in gets] == ["bytes=1000-1999"]  # only the range travelled


def test_redirect_mode_sends_the_caller_to_a_presigned_url_after_every_check(
    redirecting: TestClient,
    population: Population,
    sessions: sessionmaker[Session],
    s3_server: S3TestServer,
) -> None:
    export = make_export(redirecting, population)
    url = export["download_url"]
    before = len(s3_server.front.requests)
    # Checks first: a member, an outsider and a forged signature never get a storage URL
    assert redirecting.get(url, headers=bearer(population, "member")).status_code == 403
    assert redirecting.get(url, headers=bearer(population, "outsider")).status_code == 404
    assert redirecting.get(url + "0", headers=bearer(population)).status_code == 403
    # The admin is redirected, and the API carried no bytes
    response = redirecting.get(url, headers=bearer(population), follow_redirects=False)
    assert response.status_code == 302
    assert response.headers["cache-control"] == "no-store"
    assert response.content == b""
    location = response.headers["location"]
    query = parse_qs(urlsplit(location).query)
    assert query["X-Amz-Expires"] == [str(REDIRECT_SECONDS)]
    assert query["response-content-disposition"] == [
        f'attachment; filename="{export["file"]["name"]}"'
    ]
    assert query["response-content-type"] == ["text/csv; charset=utf-8"]
    assert not [r for r in s3_server.front.requests[before:] if r[0] == "GET"]  # nothing fetched
    # The storage serves the file, named and typed, ranges included
    status, body, headers = fetch(location)
    assert status == 200 and len(body) == export["file"]["size_bytes"]
    assert headers["content-disposition"] == f'attachment; filename="{export["file"]["name"]}"'
    assert headers["content-type"] == "text/csv; charset=utf-8"
    status, part, _ = fetch(location, Range="bytes=0-99")
    assert (status, part) == (206, body[:100])
    # The audit trail says which attempts were redirected
    with sessions() as session:
        rows = list(
            session.scalars(
                select(DownloadAttempt)
                .where(DownloadAttempt.export_id == uuid.UUID(export["id"]))
                .order_by(DownloadAttempt.id)
            )
        )
    assert [(r.outcome, r.redirect) for r in rows] == [
        ("forbidden", False),
        ("not_found", False),
        ("bad_signature", False),
        ("ok", True),
    ]
    # And the presigned URL stops working after REDIRECT_SECONDS
    time.sleep(REDIRECT_SECONDS + 1.2)  # X-Amz-Date is in whole seconds
    status, body, _ = fetch(location)
    assert status == 403 and b"Request has expired" in body


def test_a_gzip_export_goes_through_s3_and_redirects_as_application_gzip(
    redirecting: TestClient, population: Population
) -> None:
    plain = make_export(redirecting, population)
    packed = make_export(redirecting, population, compression="gzip")
    assert packed["file"]["name"].endswith(".csv.gz")
    plain_body = fetch(
        redirecting.get(
            plain["download_url"], headers=bearer(population), follow_redirects=False
        ).headers["location"]
    )[1]
    response = redirecting.get(
        packed["download_url"], headers=bearer(population), follow_redirects=False
    )
    status, stored, headers = fetch(response.headers["location"])
    assert status == 200 and headers["content-type"] == "application/gzip"
    assert len(stored) == packed["file"]["size_bytes"]
    assert gzip.decompress(stored) == plain_body


def test_the_audit_api_shows_redirects(redirecting: TestClient, population: Population) -> None:
    export = make_export(redirecting, population)
    redirecting.get(export["download_url"], headers=bearer(population), follow_redirects=False)
    rows = redirecting.get(
        f"/api/v1/order-exports/{export['id']}/downloads", headers=bearer(population)
    ).json()["downloads"]
    assert [(r["outcome"], r["redirect"], r["bytes"]) for r in rows] == [("ok", True, None)]
