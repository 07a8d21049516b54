"""Browser login: argon2 check, session cookie flags, CSRF on writes, throttling, headers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx2
import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import create_app
from shared.db import transaction
from shared.identity import ensure_account, set_membership, upsert_user
from shared.models import Role, User
from shared.settings import Settings

PASSWORD = "admin-password"


@pytest.fixture(scope="module")
def app_settings(settings: Settings, sessions: sessionmaker[Session]) -> Settings:
    with transaction(sessions) as session:
        account = ensure_account(session, slug="acme")
        for email in (
            "admin@acme.test",
            "gone@acme.test",
            "throttled@acme.test",
            "changed@acme.test",
        ):
            user = upsert_user(session, email=email, password=PASSWORD)
            set_membership(session, account=account, user=user, role=Role.ADMIN)
    return settings.model_copy(update={"login_max_failures": 3})


@pytest.fixture
def client(app_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings), base_url="http://127.0.0.1") as client:
        yield client


def log_in(
    client: TestClient,
    email: str,
    password: str = PASSWORD,
    *,
    headers: dict[str, str] | None = None,
    **extra: str,
) -> httpx2.Response:
    return client.post(
        "/login",
        data={"email": email, "password": password, **extra},
        headers=headers,
        follow_redirects=False,
    )


def test_login_form_renders_with_csrf_field(client: TestClient) -> None:
    page = client.get("/login")
    assert page.status_code == 200
    assert 'name="csrf_token"' in page.text and 'name="email"' in page.text


def test_login_sets_a_hardened_session_cookie_and_redirects(client: TestClient) -> None:
    response = client.post(
        "/login",
        data={"email": "ADMIN@acme.test", "password": PASSWORD, "next": "/accounts/acme/orders"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/accounts/acme/orders"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("oex_session=")
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
    assert "secure" not in cookie.lower()  # plain HTTP here; SESSION_COOKIE_SECURE turns it on
    assert client.get("/api/v1/accounts/acme/orders").status_code == 200


def test_secure_cookie_and_hsts_behind_https(app_settings: Settings) -> None:
    secure = app_settings.model_copy(update={"session_cookie_secure": True})
    with TestClient(create_app(secure), base_url="https://127.0.0.1") as client:
        response = log_in(client, "admin@acme.test")
        assert "secure" in response.headers["set-cookie"].lower()
        assert "strict-transport-security" in client.get("/healthz").headers


def test_wrong_password_and_unknown_user_look_the_same(client: TestClient) -> None:
    wrong = log_in(client, "admin@acme.test", "nope-nope")
    unknown = log_in(client, "nobody@acme.test", "nope-nope")
    assert wrong.status_code == unknown.status_code == 401
    assert "Invalid email or password" in wrong.text


def test_open_redirects_are_not_followed(client: TestClient) -> None:
    for target in ("https://evil.test/", "//evil.test", "/\\evil.test"):
        response = log_in(client, "admin@acme.test", next=target)
        assert response.headers["location"] == "/"


def test_cross_site_login_is_refused(client: TestClient) -> None:
    response = log_in(client, "admin@acme.test", headers={"Origin": "https://evil.test"})
    assert response.status_code == 403


def test_json_login_returns_the_csrf_token(client: TestClient) -> None:
    response = log_in(client, "admin@acme.test", headers={"Accept": "application/json"})
    assert response.status_code == 200
    assert len(response.json()["csrf_token"]) > 20


def test_cookie_writes_need_the_csrf_token(client: TestClient) -> None:
    log_in(client, "admin@acme.test")
    refused = client.post("/logout", follow_redirects=False)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "csrf_failed"
    forged = client.post("/logout", data={"csrf_token": "forged"}, follow_redirects=False)
    assert forged.status_code == 403
    token = client.get("/login").text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    accepted = client.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert accepted.status_code == 303
    assert client.get("/api/v1/accounts/acme/orders").status_code == 401


def test_brute_force_is_throttled(client: TestClient) -> None:
    for _ in range(3):
        assert log_in(client, "throttled@acme.test", "guess-guess").status_code == 401
    blocked = log_in(client, "throttled@acme.test")  # even the right password now waits
    assert blocked.status_code == 429
    assert int(blocked.headers["retry-after"]) > 0


def deactivate(session: Session, email: str) -> None:
    session.execute(update(User).where(User.email == email).values(is_active=False))


def change_password(session: Session, email: str) -> None:
    upsert_user(session, email=email, password="another-password")


@pytest.mark.parametrize(
    ("email", "change"),
    [("gone@acme.test", deactivate), ("changed@acme.test", change_password)],
)
def test_a_deactivated_user_or_a_changed_password_ends_existing_sessions(
    client: TestClient,
    sessions: sessionmaker[Session],
    email: str,
    change: Callable[[Session, str], None],
) -> None:
    log_in(client, email)
    assert client.get("/api/v1/accounts/acme/orders?limit=1").status_code == 200
    with transaction(sessions) as session:
        change(session, email)
    assert client.get("/api/v1/accounts/acme/orders?limit=1").status_code == 401
    assert log_in(client, email).status_code == 401  # nor does the old login work again


def test_security_headers_on_html(client: TestClient) -> None:
    headers = client.get("/login").headers
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    assert "python_info" in client.get("/metrics").text
