"""Small exports never wait behind big ones: the fast lane (shared/lanes.py).

A request picks the lane from its bounded row count; a real worker process (PostgreSQL, Redis,
Kafka-protocol broker, local storage) claims a small export on its fast-lane thread while every
thread of the normal lane is busy with a big export and more big ones wait, and the
one-running-export-per-account rule still holds on the fast lane. The assertions are about
order (what is running, queued or ready when the small export is ready), never about seconds.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from services.worker.actors import Actors
from shared.db import transaction
from shared.exports import request_export
from shared.flags import FlagCache
from shared.lanes import FAST, NORMAL, lane_for
from shared.models import ExportJob, ExportState, OutboxMessage, User
from shared.settings import Settings
from tests.support.jobs import make_job, seeded_admin
from tests.support.processes import WorkerProcess, kill_if_running, terminate
from tests.support.waiting import wait_until

#: Orders of each big account: at the brake below, an export of one takes about 15 s.
BIG_ORDERS = 5000
#: Orders of the small account (one small export streams them in well under a second).
SMALL_ORDERS = 100
#: Normal-lane threads of the worker under test (each gets a big export).
NORMAL_THREADS = 2


@pytest.fixture(scope="module")
def ids(sessions: sessionmaker[Session]) -> dict[str, int]:
    accounts = [("big-one", BIG_ORDERS, 1), ("big-two", BIG_ORDERS, 2), ("small", SMALL_ORDERS, 3)]
    return seeded_admin(sessions, "lanes@example.test", accounts)


def state_of(sessions: sessionmaker[Session], export_id: uuid.UUID) -> ExportJob:
    with sessions() as session:
        return session.get_one(ExportJob, export_id)


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
    sessions: sessionmaker[Session],
    run_worker: WorkerProcess,
    actors: Actors,
    ids: dict[str, int],
) -> None:
    worker = run_worker(
        EXPORT_MAX_BYTES_PER_SECOND="40000",  # a big export (~600 kB) runs about 15 s
        EXPORT_WORKER_THREADS=str(NORMAL_THREADS),
        EXPORT_FAST_LANE_THREADS="1",
        WORKER_SHUTDOWN_GRACE_SECONDS="0",
    )
    try:
        # Given both normal-lane threads stream a big export (two accounts), and a third big
        # export waits in the normal lane behind them
        big = [
            make_job(sessions, account_id=ids[s], user_id=ids["user"])
            for s in ("big-one", "big-two")
        ]
        for export_id in big:
            actors.send_generate(str(export_id), lane=NORMAL)
        wait_until(
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
        wait_until(
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
        with contextlib.suppress(subprocess.TimeoutExpired):  # killed then
            terminate(worker, 30)
        kill_if_running(worker)
