"""Sessions and tokens that can be ended, against real PostgreSQL: browser sessions live on the
server (a copied cookie dies with logout, password change, deactivation, membership removal,
idle timeout and absolute lifetime), and bearer tokens can be listed, revoked and expire, through
the real `orders-export tokens ...` command run as a separate process."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import SESSION_COOKIE, create_app
from shared.db import transaction
from shared.identity import (
    ensure_account,
    find_user,
    get_account,
    remove_membership,
    set_membership,
    upsert_user,
)
from shared.models import ApiToken, Role, User, WebSession
from shared.settings import Settings

PASSWORD = "admin-password"
REPORT = "/api/v1/accounts/acme/orders?limit=1"
EMAILS = [
    "copied@acme.test",
    "changed@acme.test",
    "gone@acme.test",
    "removed@acme.test",
    "idle@acme.test",
    "old@acme.test",
    "token@acme.test",
    "fixation@acme.test",
]


@pytest.fixture(scope="module")
def app_settings(settings: Settings, sessions: sessionmaker[Session]) -> Settings:
    with transaction(sessions) as session:
        account = ensure_account(session, slug="acme")
        for email in EMAILS:
            user = upsert_user(session, email=email, password=PASSWORD)
            set_membership(session, account=account, user=user, role=Role.ADMIN)
    return settings.model_copy(
        update={"session_idle_seconds": 3600, "session_lifetime_seconds": 86400}
    )


@pytest.fixture
def client(app_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(app_settings), base_url="http://127.0.0.1") as client:
        yield client


def log_in(client: TestClient, email: str) -> str:
    response = client.post(
        "/login",
        data={"email": email, "password": PASSWORD},
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["csrf_token"])


def cookie(client: TestClient) -> str:
    value = client.cookies.get(SESSION_COOKIE)
    assert value
    return value


def with_cookie(app_settings: Settings, value: str) -> TestClient:
    """Another browser that was handed a copy of the cookie."""
    other = TestClient(create_app(app_settings), base_url="http://127.0.0.1")
    other.cookies.set(SESSION_COOKIE, value)
    return other


def rows_of(sessions: sessionmaker[Session], email: str) -> list[WebSession]:
    with sessions() as session:
        user = find_user(session, email)
        assert user is not None
        return list(session.scalars(select(WebSession).where(WebSession.user_id == user.id)))


def test_the_cookie_holds_a_random_id_not_the_user(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    log_in(client, "fixation@acme.test")
    payload = cookie(client).split(".", 1)[0]
    data = json.loads(base64.b64decode(payload + "=" * (-len(payload) % 4)))
    assert "user_id" not in data and "fingerprint" not in data
    assert len(data["sid"]) >= 40
    assert len(rows_of(sessions, "fixation@acme.test")) == 1  # stored: only its digest
    assert rows_of(sessions, "fixation@acme.test")[0].id_sha256 != data["sid"]


def test_logout_ends_a_copied_cookie(client: TestClient, app_settings: Settings) -> None:
    csrf = log_in(client, "copied@acme.test")
    copied = cookie(client)
    with with_cookie(app_settings, copied) as thief:
        assert thief.get(REPORT).status_code == 200
        out = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
        assert out.status_code == 303
        assert thief.get(REPORT).status_code == 401


def test_password_change_ends_sessions(
    client: TestClient, app_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    log_in(client, "changed@acme.test")
    with with_cookie(app_settings, cookie(client)) as copy:
        assert copy.get(REPORT).status_code == 200
        with transaction(sessions) as session:
            upsert_user(session, email="changed@acme.test", password="another-password")
        assert copy.get(REPORT).status_code == 401
    assert rows_of(sessions, "changed@acme.test") == []


def test_deactivation_ends_sessions(client: TestClient, sessions: sessionmaker[Session]) -> None:
    log_in(client, "gone@acme.test")
    assert client.get(REPORT).status_code == 200
    with transaction(sessions) as session:
        session.execute(update(User).where(User.email == "gone@acme.test").values(is_active=False))
    assert client.get(REPORT).status_code == 401
    with transaction(sessions) as session:
        session.execute(update(User).where(User.email == "gone@acme.test").values(is_active=True))
    assert client.get(REPORT).status_code == 401  # reactivation does not bring it back


def test_membership_removal_ends_sessions(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    log_in(client, "removed@acme.test")
    assert client.get(REPORT).status_code == 200
    with transaction(sessions) as session:
        user = find_user(session, "removed@acme.test")
        assert user is not None
        remove_membership(session, account=get_account(session, "acme"), user=user)
        set_membership(session, account=get_account(session, "acme"), user=user, role=Role.ADMIN)
    assert client.get(REPORT).status_code == 401  # member again, but that session is over
    assert rows_of(sessions, "removed@acme.test") == []


def age(sessions: sessionmaker[Session], email: str, **columns: dt.timedelta) -> None:
    now = dt.datetime.now(dt.UTC)
    with transaction(sessions) as session:
        user = find_user(session, email)
        assert user is not None
        session.execute(
            update(WebSession)
            .where(WebSession.user_id == user.id)
            .values({name: now - delta for name, delta in columns.items()})
        )


def test_an_idle_session_ends(client: TestClient, sessions: sessionmaker[Session]) -> None:
    log_in(client, "idle@acme.test")
    age(sessions, "idle@acme.test", last_seen_at=dt.timedelta(minutes=50))
    assert client.get(REPORT).status_code == 200  # within SESSION_IDLE_SECONDS: renewed
    (row,) = rows_of(sessions, "idle@acme.test")
    assert dt.datetime.now(dt.UTC) - row.last_seen_at < dt.timedelta(minutes=5)
    age(sessions, "idle@acme.test", last_seen_at=dt.timedelta(minutes=61))
    assert client.get(REPORT).status_code == 401


def test_a_session_ends_after_its_absolute_lifetime(
    client: TestClient, sessions: sessionmaker[Session]
) -> None:
    log_in(client, "old@acme.test")
    age(sessions, "old@acme.test", created_at=dt.timedelta(hours=23))
    assert client.get(REPORT).status_code == 200
    age(sessions, "old@acme.test", created_at=dt.timedelta(hours=25))
    assert client.get(REPORT).status_code == 401  # however active it was


# -- tokens ---------------------------------------------------------------------------------


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "SECRET_KEY": settings.secret_key,
    }
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", "tokens", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tokens_of(sessions: sessionmaker[Session], email: str) -> list[ApiToken]:
    with sessions() as session:
        user = find_user(session, email)
        assert user is not None
        return list(
            session.scalars(
                select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)
            )
        )


def test_tokens_can_be_listed_revoked_and_expire(
    client: TestClient, app_settings: Settings, sessions: sessionmaker[Session]
) -> None:
    email = "token@acme.test"
    made = [cli(app_settings, "create", "--email", email) for _ in range(2)]
    assert all(result.returncode == 0 for result in made), [r.stderr for r in made]
    first, second = (result.stdout.strip() for result in made)
    expiring = cli(app_settings, "create", "--email", email, "--expires-in", "1")
    assert expiring.returncode == 0, expiring.stderr
    third = expiring.stdout.strip()
    assert client.get(REPORT, headers=bearer(first)).status_code == 200
    assert client.get(REPORT, headers=bearer(third)).status_code == 200

    listing = cli(app_settings, "list", "--email", email)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.strip().splitlines()
    assert lines[0].split() == ["id", "prefix", "created", "last_used", "expires", "revoked"]
    rows = tokens_of(sessions, email)
    assert len(lines) == 1 + len(rows) == 4
    for line, token, row in zip(lines[1:], (first, second, third), rows, strict=True):
        fields = line.split("\t")
        assert fields[0] == str(row.id) and token.startswith(fields[1]) and len(fields[1]) == 12
        assert token not in listing.stdout  # never the token itself
    assert lines[1].split("\t")[3] != "never" and lines[2].split("\t")[3] == "never"
    assert lines[3].split("\t")[4] != "never"

    # last_used_at moves at most once a minute.
    stamp = tokens_of(sessions, email)[0].last_used_at
    assert stamp is not None
    assert client.get(REPORT, headers=bearer(first)).status_code == 200
    assert tokens_of(sessions, email)[0].last_used_at == stamp
    with transaction(sessions) as session:
        session.execute(
            update(ApiToken)
            .where(ApiToken.id == rows[0].id)
            .values(last_used_at=stamp - dt.timedelta(minutes=2))
        )
    assert client.get(REPORT, headers=bearer(first)).status_code == 200
    renewed = tokens_of(sessions, email)[0].last_used_at
    assert renewed is not None and renewed > stamp - dt.timedelta(minutes=1)

    # Expiry: the third token, once past its expiry, gets 401.
    with transaction(sessions) as session:
        session.execute(
            update(ApiToken)
            .where(ApiToken.id == rows[2].id)
            .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    assert client.get(REPORT, headers=bearer(third)).status_code == 401

    # Revoke one, then all.
    one = cli(app_settings, "revoke", "--email", email, "--id", str(rows[0].id))
    assert one.returncode == 0, one.stderr
    assert client.get(REPORT, headers=bearer(first)).status_code == 401
    assert client.get(REPORT, headers=bearer(second)).status_code == 200
    assert cli(app_settings, "revoke", "--email", email, "--id", "999999").returncode == 3
    everything = cli(app_settings, "revoke", "--email", email)
    assert everything.returncode == 0, everything.stderr
    assert client.get(REPORT, headers=bearer(second)).status_code == 401
    assert all(row.revoked_at is not None for row in tokens_of(sessions, email))
    assert cli(app_settings, "create", "--email", email, "--expires-in", "0").returncode == 2
