"""Leaks and defaults, against real PostgreSQL, a real uvicorn and real sockets: signed links are
never cached, never built from the Host header and never logged; SQL errors hide parameters;
stack.json is private; key rotation keeps old links working; the unauthenticated tables are
pruned; the API's metrics can move off its public port."""

from __future__ import annotations

import datetime as dt
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx2
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import create_app
from services.worker.actors import Actors
from services.worker.maintenance import Maintenance
from shared.db import make_engine, transaction
from shared.devstack.ports import free_port
from shared.devstack.stack import Stack
from shared.errors import BadSignature, ConfigurationError
from shared.identity import ensure_account, set_membership, upsert_user
from shared.models import DownloadAttempt, LoginAttempt, Role, WebSession
from shared.settings import Settings
from shared.signing import SigningKeys, download_path, verify
from shared.storage import storage_from_url
from tests.integration.reportdata import Population, populate

EXPORTS = "/api/v1/accounts/acme/order-exports"


#: What the module's app changes of the test settings (tests/integration/conftest.py).
APP_SETTINGS = {"export_max_active_per_user": 1000}


@pytest.fixture(scope="module")
def population(sessions: sessionmaker[Session]) -> Population:
    return populate(sessions, orders=30)


def bearer(population: Population) -> dict[str, str]:
    return {"Authorization": f"Bearer {population.tokens['admin']}"}


def test_responses_with_signed_links_are_not_cached(
    client: TestClient, population: Population
) -> None:
    made = client.post(EXPORTS, json={"filters": {"q": "cache"}}, headers=bearer(population))
    assert made.status_code == 201 and made.json()["export"]["download_url"]
    export_id = made.json()["export"]["id"]
    responses = [
        made,
        client.get(EXPORTS, headers=bearer(population)),
        client.get(f"/api/v1/order-exports/{export_id}", headers=bearer(population)),
    ]
    for response in responses:
        assert response.status_code < 300, response.text
        assert response.headers["cache-control"] == "no-store", response.request.url


def test_absolute_urls_never_come_from_the_host_header(
    client: TestClient, app_settings: Settings, population: Population
) -> None:
    evil = {**bearer(population), "Host": "evil.test"}
    made = client.post(EXPORTS, json={"filters": {"q": "host"}}, headers=evil)
    assert made.status_code == 201, made.text
    assert "evil.test" not in made.json()["export"]["download_url"]
    listed = client.get(EXPORTS, headers=evil)
    assert "evil.test" not in listed.text
    page = client.get("/login", headers={"Host": "evil.test"})
    assert "evil.test" not in page.text
    public = app_settings.model_copy(update={"public_url": "https://orders.example.test"})
    with TestClient(create_app(public), base_url="http://127.0.0.1") as behind:
        made = behind.post(EXPORTS, json={"filters": {"q": "public"}}, headers=evil)
        url = made.json()["export"]["download_url"]
        assert url.startswith("https://orders.example.test/exports/"), url
        page = behind.get("/login", headers={"Host": "evil.test"})
        assert "https://orders.example.test/static/app.css" in page.text


def test_uvicorn_access_logs_redact_signatures(
    app_settings: Settings, population: Population, tmp_path: Path
) -> None:
    port = free_port()
    log = (tmp_path / "api.log").open("wb")
    env = {
        **os.environ,
        "DATABASE_URL": app_settings.database_url,
        "SECRET_KEY": app_settings.secret_key,
        "STORAGE_URL": str(app_settings.storage_url),
    }
    # The production command line (Dockerfile), access log included.
    child = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "services.api.app:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx2.get(f"{base}/healthz", timeout=2, trust_env=False)
                break
            except httpx2.TransportError:
                assert child.poll() is None and time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.2)
        secret = "k0." + "5ec7e7" * 10
        link = f"{base}/exports/{uuid.uuid4()}/download?expires=4102444800&signature={secret}"
        refused = httpx2.get(link, headers=bearer(population), timeout=10, trust_env=False)
        assert refused.status_code == 404
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)
        log.close()
    written = (tmp_path / "api.log").read_text()
    assert "/download?expires=4102444800&signature=[redacted]" in written, written
    assert "5ec7e7" not in written


def test_sql_errors_do_not_carry_bound_parameters(app_settings: Settings) -> None:
    engine = make_engine(app_settings.database_url, pool_size=1)
    try:
        with engine.connect() as conn, pytest.raises(DBAPIError) as caught:
            conn.execute(text("SELECT CAST(:value AS text), 1 / 0"), {"value": "s3cr3t-p4ram"})
        assert "division by zero" in str(caught.value)
        assert "s3cr3t-p4ram" not in str(caught.value)
    finally:
        engine.dispose()


def test_stack_json_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    stack = Stack(host="127.0.0.1", port=0, data_dir=tmp_path / "dev", demo_orders=0)
    stack.layout.create()
    stack.env = {"SECRET_KEY": "a-secret-that-must-stay-private"}
    stack.publish()
    assert stat.S_IMODE(stack.layout.stack_file.stat().st_mode) == 0o600


# -- key rotation ---------------------------------------------------------------------------

NEW_KEY = "k1:" + "n" * 32


def test_first_rotation_keeps_links_signed_with_the_derived_key(
    client: TestClient, app_settings: Settings, population: Population
) -> None:
    made = client.post(EXPORTS, json={"filters": {"q": "rotate"}}, headers=bearer(population))
    old_link = made.json()["export"]["download_url"]
    assert "signature=k0." in old_link
    rotated = app_settings.model_copy(update={"download_signing_keys": NEW_KEY})
    with TestClient(create_app(rotated), base_url="http://127.0.0.1") as after:
        assert after.get(old_link, headers=bearer(population)).status_code == 200
        fresh = after.get(f"{EXPORTS}", headers=bearer(population)).json()["exports"][0]
        assert "signature=k1." in fresh["download_url"]
    retired = rotated.model_copy(update={"download_signing_keep_derived": False})
    with TestClient(create_app(retired), base_url="http://127.0.0.1") as later:
        assert later.get(old_link, headers=bearer(population)).status_code == 403


def test_keys_verify_only_until_retired(app_settings: Settings) -> None:
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    derived = SigningKeys.from_settings(app_settings)
    path = download_path(derived, export_id="e", user_id=1, expires_at=expires)
    query = dict(part.split("=") for part in path.split("?")[1].split("&"))
    keys = SigningKeys.from_settings(
        app_settings.model_copy(update={"download_signing_keys": NEW_KEY})
    )
    assert keys.active == "k1"
    verify(keys, export_id="e", user_id=1, **query)
    retired = app_settings.model_copy(
        update={"download_signing_keys": NEW_KEY, "download_signing_keep_derived": False}
    )
    with pytest.raises(BadSignature):
        verify(SigningKeys.from_settings(retired), export_id="e", user_id=1, **query)


@pytest.mark.parametrize(
    "keys", ["k1:" + "a" * 20 + ",k1:" + "b" * 20, "k2:" + "a" * 20 + ",k0:" + "b" * 20]
)
def test_a_repeated_key_id_is_an_error_at_start(app_settings: Settings, keys: str) -> None:
    with pytest.raises(ValueError, match="DOWNLOAD_SIGNING_KEYS"):
        Settings(
            database_url=app_settings.database_url,
            secret_key=app_settings.secret_key,
            download_signing_keys=keys,
        )
    with pytest.raises(ConfigurationError, match="repeated"):
        create_app(app_settings.model_copy(update={"download_signing_keys": keys}))


# -- pruning --------------------------------------------------------------------------------


def test_maintenance_prunes_what_unauthenticated_requests_leave(
    app_settings: Settings, sessions: sessionmaker[Session], actors: Actors, tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    settings = app_settings.model_copy(
        update={"login_throttle_window_seconds": 300, "audit_retention_days": 30}
    )
    with transaction(sessions) as session:
        account = ensure_account(session, slug="prune")
        user = upsert_user(session, email="prune@example.test", password="long-enough-pw")
        set_membership(session, account=account, user=user, role=Role.ADMIN)
        ago = {
            "old": now - dt.timedelta(seconds=301),
            "new": now - dt.timedelta(seconds=10),
        }
        session.add_all(
            [
                LoginAttempt(email="old@x.test", client="192.0.2.1", attempted_at=ago["old"]),
                LoginAttempt(email="new@x.test", client="192.0.2.1", attempted_at=ago["new"]),
                DownloadAttempt(outcome="forbidden", at=now - dt.timedelta(days=31)),
                DownloadAttempt(outcome="ok", at=now - dt.timedelta(days=29)),
                WebSession(
                    id_sha256="a" * 64, user_id=user.id, last_seen_at=now - dt.timedelta(days=2)
                ),
                WebSession(id_sha256="b" * 64, user_id=user.id),
            ]
        )
    storage = storage_from_url((tmp_path / "files").as_uri())
    storage.prepare()
    Maintenance(settings=settings, sessions=sessions, storage=storage, actors=actors).round()
    with sessions() as session:
        emails = set(session.scalars(select(LoginAttempt.email)))
        assert "old@x.test" not in emails and "new@x.test" in emails
        kept = list(session.scalars(select(DownloadAttempt.at)))
        assert min(kept) > now - dt.timedelta(days=30)  # the 31-day-old row is gone
        assert any(at < now - dt.timedelta(days=28) for at in kept)  # the 29-day-old one stays
        assert set(session.scalars(select(WebSession.id_sha256))) == {"b" * 64}


# -- metrics off the public port ------------------------------------------------------------


def test_the_api_can_serve_its_metrics_on_a_port_of_their_own(app_settings: Settings) -> None:
    port = free_port()
    moved = app_settings.model_copy(update={"metrics_port": port})
    with TestClient(create_app(moved), base_url="http://127.0.0.1") as client:
        assert client.get("/metrics").status_code == 404  # not on the public port
        # A second worker process of the same API finds the port taken and leaves it be.
        with TestClient(create_app(moved), base_url="http://127.0.0.1") as second:
            assert second.get("/healthz").status_code == 200
        deadline = time.monotonic() + 10
        while True:
            try:
                body = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=2, trust_env=False)
                break
            except httpx2.TransportError:
                assert time.monotonic() < deadline, "no metrics on METRICS_PORT"
                time.sleep(0.1)
        assert "orders_export_downloads_total" in body.text
