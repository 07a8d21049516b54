"""Login throttling under bursts, against real PostgreSQL and the real app: the per-email limit
holds for parallel attempts, a client spraying many emails is limited too (its address only from
trusted proxies' X-Forwarded-For), a success clears the email's failures, and password checks run
at most LOGIN_MAX_CONCURRENT_CHECKS at a time per process."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import create_app
from shared.db import transaction
from shared.identity import ensure_account, set_membership, upsert_user
from shared.models import LoginAttempt, Role
from shared.settings import Settings

PASSWORD = "admin-password"
PEER = ("10.1.2.3", 40000)


@pytest.fixture(scope="module")
def base_settings(settings: Settings, sessions: sessionmaker[Session]) -> Settings:
    with transaction(sessions) as session:
        account = ensure_account(session, slug="acme")
        for index in range(12):
            user = upsert_user(session, email=f"user{index}@acme.test", password=PASSWORD)
            set_membership(session, account=account, user=user, role=Role.ADMIN)
    return settings.model_copy(
        update={
            "login_max_failures": 3,
            "login_max_failures_per_client": 100,
            "login_max_concurrent_checks": 64,
        }
    )


@pytest.fixture
def make_client(base_settings: Settings) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(peer: tuple[str, int] = PEER, **changes: object) -> TestClient:
        client = TestClient(
            create_app(base_settings.model_copy(update=changes)),
            base_url="http://127.0.0.1",
            client=peer,
        )
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def log_in(client: TestClient, email: str, password: str, **headers: str) -> httpx2.Response:
    return client.post(
        "/login",
        data={"email": email, "password": password},
        headers={"Accept": "application/json", **headers},
    )


def burst(client: TestClient, attempts: list[tuple[str, str]]) -> list[httpx2.Response]:
    """All attempts at once (released together by a barrier)."""
    barrier = threading.Barrier(len(attempts))

    def one(attempt: tuple[str, str]) -> httpx2.Response:
        barrier.wait()
        return log_in(client, *attempt)

    with ThreadPoolExecutor(len(attempts)) as pool:
        return list(pool.map(one, attempts))


def failures(sessions: sessionmaker[Session], email: str) -> int:
    with sessions() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(LoginAttempt).where(LoginAttempt.email == email)
            )
            or 0
        )


def test_a_burst_of_wrong_passwords_gets_at_most_the_limit_of_checks(
    make_client: Callable[..., TestClient], sessions: sessionmaker[Session]
) -> None:
    client = make_client()
    responses = burst(client, [("user0@acme.test", "wrong-guess")] * 10)
    statuses = Counter(r.status_code for r in responses)
    assert statuses[401] <= 3, statuses  # at most LOGIN_MAX_FAILURES password checks
    assert statuses[401] + statuses[429] == 10, statuses
    assert all(int(r.headers["retry-after"]) > 0 for r in responses if r.status_code == 429)
    assert failures(sessions, "user0@acme.test") <= 3


def test_one_client_spraying_many_emails_is_limited(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(peer=("10.1.2.4", 1), login_max_failures_per_client=4)
    statuses = [log_in(client, f"user{i}@acme.test", "wrong-guess").status_code for i in (1, 2)]
    statuses += [log_in(client, f"nobody{i}@acme.test", "wrong-guess").status_code for i in (1, 2)]
    assert statuses == [401] * 4
    refused = log_in(client, "user3@acme.test", PASSWORD)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) > 0
    assert refused.json()["error"]["code"] == "too_many_attempts"
    # X-Forwarded-For is not trusted by default: a forged one does not escape the limit.
    forged = log_in(client, "user3@acme.test", PASSWORD, **{"X-Forwarded-For": "192.0.2.77"})
    assert forged.status_code == 429
    # Another client is not affected.
    other = make_client(peer=("10.9.9.9", 1), login_max_failures_per_client=4)
    assert log_in(other, "user3@acme.test", PASSWORD).status_code == 200


def test_behind_a_trusted_proxy_the_forwarded_client_counts(
    make_client: Callable[..., TestClient],
) -> None:
    proxy = make_client(
        peer=("10.0.0.5", 1), login_max_failures_per_client=2, trusted_proxies="10.0.0.0/24"
    )
    for email in ("user4@acme.test", "user5@acme.test"):
        response = log_in(proxy, email, "wrong-guess", **{"X-Forwarded-For": "198.51.100.1"})
        assert response.status_code == 401
    blocked = log_in(proxy, "user6@acme.test", PASSWORD, **{"X-Forwarded-For": "198.51.100.1"})
    assert blocked.status_code == 429
    # The client prepending a forged address does not help: the proxy's own entry counts.
    spoofed = log_in(
        proxy, "user6@acme.test", PASSWORD, **{"X-Forwarded-For": "203.0.113.9, 198.51.100.1"}
    )
    assert spoofed.status_code == 429
    other = log_in(proxy, "user6@acme.test", PASSWORD, **{"X-Forwarded-For": "198.51.100.2"})
    assert other.status_code == 200


def test_a_successful_login_clears_the_emails_failures(
    make_client: Callable[..., TestClient], sessions: sessionmaker[Session]
) -> None:
    client = make_client()
    for _ in range(2):
        assert log_in(client, "user7@acme.test", "wrong-guess").status_code == 401
    assert log_in(client, "user7@acme.test", PASSWORD).status_code == 200
    assert failures(sessions, "user7@acme.test") == 0
    for _ in range(3):
        assert log_in(client, "user7@acme.test", "wrong-guess").status_code == 401
    assert log_in(client, "user7@acme.test", PASSWORD).status_code == 429


def test_concurrent_password_checks_are_bounded(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(login_max_concurrent_checks=1)
    attempts = [(f"user{8 + i % 4}@acme.test", PASSWORD) for i in range(8)]
    responses = burst(client, attempts)
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] >= 1 and statuses[200] >= 1, statuses
    for response in responses:
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) > 0
            assert response.json()["error"]["code"] == "overloaded"
