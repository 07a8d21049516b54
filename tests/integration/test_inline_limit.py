"""Exports made inside the request are bounded per user (EXPORT_MAX_INLINE_PER_MINUTE), also
under a burst of identical requests, against real PostgreSQL and file storage over HTTP."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import INLINE_POOL_SIZE, create_app
from shared.db import transaction
from shared.identity import create_token, ensure_account, find_user, set_membership, upsert_user
from shared.models import ExportJob, Role
from shared.seeding import seed_orders
from shared.settings import Settings

LIMIT = 3
EXPORTS = "/api/v1/accounts/inline/order-exports"


@pytest.fixture(scope="module")
def tokens(sessions: sessionmaker[Session]) -> dict[str, str]:
    with transaction(sessions) as session:
        account = ensure_account(session, slug="inline")
        seed_orders(session, account, orders=40, seed=3)
        made = {}
        for who in ("burst", "steady", "other", "pooled"):
            user = upsert_user(session, email=f"{who}@inline.test", password="long-enough-pw")
            set_membership(session, account=account, user=user, role=Role.ADMIN)
            made[who] = create_token(session, user)
        return made


@pytest.fixture(scope="module")
def client(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, tokens: dict[str, str]
) -> Iterator[TestClient]:
    storage = Path(tmp_path_factory.mktemp("storage")).as_uri()
    limited = settings.model_copy(
        update={
            "storage_url": storage,
            "export_max_inline_per_minute": LIMIT,
            "export_max_active_per_user": 100,
        }
    )
    with TestClient(create_app(limited), base_url="http://127.0.0.1") as client:
        yield client


def post(client: TestClient, token: str, q: str) -> httpx2.Response:
    return client.post(
        EXPORTS, json={"filters": {"q": q}}, headers={"Authorization": f"Bearer {token}"}
    )


def jobs_of(sessions: sessionmaker[Session], email: str) -> int:
    with sessions() as session:
        user = find_user(session, email)
        assert user is not None
        return int(
            session.scalar(
                select(func.count()).select_from(ExportJob).where(ExportJob.requested_by == user.id)
            )
            or 0
        )


def test_inline_exports_per_minute_are_bounded(
    client: TestClient, tokens: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    statuses = [post(client, tokens["steady"], f"q{i}").status_code for i in range(LIMIT)]
    assert statuses == [201] * LIMIT
    refused = post(client, tokens["steady"], "one-more")
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "too_many_inline_exports"
    assert 0 < int(refused.headers["retry-after"]) <= 60
    assert jobs_of(sessions, "steady@inline.test") == LIMIT  # nothing made for the refusal
    assert post(client, tokens["other"], "one-more").status_code == 201  # per user


def test_identical_requests_one_after_another_or_at_once_run_at_most_the_limit(
    client: TestClient, tokens: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    # Each one is ready before the next comes, so the duplicate check does not catch them.
    statuses = Counter(post(client, tokens["burst"], "same").status_code for _ in range(8))
    assert statuses == {201: LIMIT, 429: 8 - LIMIT}, statuses
    barrier = threading.Barrier(8)

    def one(_: int) -> int:
        barrier.wait()
        return post(client, tokens["burst"], "same").status_code

    with ThreadPoolExecutor(8) as pool:
        burst = Counter(pool.map(one, range(8)))
    assert burst == {429: 8}, burst
    assert jobs_of(sessions, "burst@inline.test") == LIMIT


def _inline_backends(sessions: sessionmaker[Session]) -> set[int]:
    """PostgreSQL backends that hold an export connection of the API (inline exports)."""
    with sessions() as session:
        return set(
            session.scalars(
                text(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE application_name = 'orders-export-inline'"
                    " AND datname = current_database()"
                )
            )
        )


def test_inline_exports_run_on_pooled_connections(
    client: TestClient, tokens: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    # Given the API made one small export inside its request
    assert post(client, tokens["pooled"], "pool-0").status_code == 201
    first = _inline_backends(sessions)
    # Then the export connection stays open in the API's pool, not closed after the request
    assert first, "no pooled export connection left open"
    assert len(first) <= INLINE_POOL_SIZE
    # When it makes more
    for i in range(1, LIMIT):
        assert post(client, tokens["pooled"], f"pool-{i}").status_code == 201
    # Then they ran on the same pooled backends, never one new connection each
    after = _inline_backends(sessions)
    assert first <= after and len(after) <= INLINE_POOL_SIZE
