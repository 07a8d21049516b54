"""Small exports never wait behind big ones: the fast lane (shared/lanes.py).

A request picks the lane from its bounded row count; a real worker process (PostgreSQL, Redis,
Kafka-protocol broker, local storage) claims a small export on its fast-lane thread while every
thread of the normal lane is busy with a big export and more big ones wait, and the
one-running-export-per-account rule still holds on the fast lane. The assertions are about
order (what is running, queued or ready when the small export is ready), never about seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.worker.actors import Actors
from shared.db import transaction
from shared.exports import request_export
from shared.flags import FlagCache
from shared.identity import ensure_account, set_membership, upsert_user
from shared.lanes import FAST, NORMAL, lane_for
from shared.models import ExportJob, ExportState, OutboxMessage, Role, User
from shared.seeding import seed_orders
from shared.settings import Settings
from tests.integration.exportdata import make_job
from tests.support.processes import start_worker

#: Orders of each big account: at the brake below, an export of one takes about 15 s.
BIG_ORDERS = 5000
#: Orders of the small account (one small export streams them in well under a second).
SMALL_ORDERS = 100
#: Normal-lane threads of the worker under test (each gets a big export).
NORMAL_THREADS = 2


@pytest.fixture(scope="module")
def ids(sessions: sessionmaker[Session]) -> dict[str, int]:
    found: dict[str, int] = {}
    with transaction(sessions) as session:
        user = upsert_user(session, email="lanes@example.test", password="long-enough-pw")
        found["user"] = user.id
        for slug, orders, seed in (
            ("big-one", BIG_ORDERS, 1),
            ("big-two", BIG_ORDERS, 2),
            ("small", SMALL_ORDERS, 3),
        ):
            account = ensure_account(session, slug=slug, timezone="UTC")
            set_membership(session, account=account, user=user, role=Role.ADMIN)
            seed_orders(session, account, orders=orders, seed=seed)
            found[slug] = account.id
    return found


def state_of(sessions: sessionmaker[Session], export_id: uuid.UUID) -> ExportJob:
    with sessions() as session:
        return session.get_one(ExportJob, export_id)


def wait_for(condition: Callable[[], bool], *, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_request_picks_the_lane_by_its_row_count(
    settings: Settings, sessions: sessionmaker[Session], ids: dict[str, int]
) -> None:
    lanes = settings.model_copy(
        update={"export_async_threshold_rows": 0, "export_fast_lane_max_rows": SMALL_ORDERS}
    )
    assert lane_for(SMALL_ORDERS, settings=lanes) == FAST
    assert lane_for(SMALL_ORDERS + 1, settings=lanes) == NORMAL
    assert lane_for(None, settings=lanes) == NORMAL
    chosen = {}
    for slug in ("small", "big-one"):
        # When the account's admin asks for all of its orders
        with transaction(sessions) as session:
            requested = request_export(
                session,
                settings=lanes,
                flags=FlagCache(sessions),
                user=session.get_one(User, ids["user"]),
                slug=slug,
                body={"filters": {}},
                idempotency_key=None,
            )
            assert not requested.inline
            export_id = str(requested.job.id)
        # Then the ExportRequested event names the lane its count chose
        with sessions() as session:
            payload = session.scalar(
                select(OutboxMessage.payload).where(OutboxMessage.key == export_id)
            )
        assert payload is not None
        chosen[slug] = payload["lane"]
    assert chosen == {"small": FAST, "big-one": NORMAL}


def test_a_small_export_is_claimed_while_every_normal_thread_runs_a_big_one(
    settings: Settings,
    sessions: sessionmaker[Session],
    redis_url: str,
    broker: str,
    actors: Actors,
    ids: dict[str, int],
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "SECRET_KEY": settings.secret_key,
        "REDIS_URL": redis_url,
        "KAFKA_BOOTSTRAP_SERVERS": broker,
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "STORAGE_URL": (tmp_path / "files").as_uri(),
        "EXPORT_MAX_BYTES_PER_SECOND": "40000",  # a big export (~600 kB) runs about 15 s
        "EXPORT_WORKER_THREADS": str(NORMAL_THREADS),
        "EXPORT_FAST_LANE_THREADS": "1",
        "WORKER_SHUTDOWN_GRACE_SECONDS": "0",
    }
    log_path = tmp_path / "worker.log"
    worker = start_worker(env, log_path)
    try:
        # Given both normal-lane threads stream a big export (two accounts), and a third big
        # export waits in the normal lane behind them
        big = [
            make_job(sessions, account_id=ids[s], user_id=ids["user"])
            for s in ("big-one", "big-two")
        ]
        for export_id in big:
            actors.send_generate(str(export_id), lane=NORMAL)
        wait_for(
            lambda: all(state_of(sessions, i).rows_written > 0 for i in big),
            what="both big exports to stream",
        )
        waiting = make_job(sessions, account_id=ids["big-one"], user_id=ids["user"])
        actors.send_generate(str(waiting), lane=NORMAL)
        # and a small export of an account whose big export runs is on the fast lane too
        same_account = make_job(sessions, account_id=ids["big-two"], user_id=ids["user"])
        actors.send_generate(str(same_account), lane=FAST)
        # When a small export of a third account is sent to the fast lane
        small = make_job(sessions, account_id=ids["small"], user_id=ids["user"])
        actors.send_generate(str(small), lane=FAST)
        wait_for(
            lambda: (
                state_of(sessions, small).state not in (ExportState.QUEUED, ExportState.RUNNING)
            ),
            what="the small export to finish",
        )
        # Then it is ready, with all its rows, while both big exports are still running
        done = state_of(sessions, small)
        assert (done.state, done.row_count) == (ExportState.READY, SMALL_ORDERS)
        running = [state_of(sessions, i) for i in big]
        assert [j.state for j in running] == [ExportState.RUNNING, ExportState.RUNNING]
        assert all(j.started_at is not None and j.started_at < done.started_at for j in running)
        assert all(j.finished_at is None for j in running)
        # And the big export behind them is still waiting for a normal-lane thread
        assert state_of(sessions, waiting).state is ExportState.QUEUED
        # And the fast lane kept the one-running-export-per-account rule: the small export of
        # the account whose big export runs was not started beside it
        other = state_of(sessions, same_account)
        assert (other.state, other.started_at) == (ExportState.QUEUED, None)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
