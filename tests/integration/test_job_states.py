"""The export state machine, enforced by PostgreSQL, and the atomic claim."""

from __future__ import annotations

import itertools
import threading
import uuid

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from shared import lifecycle
from shared.db import transaction
from shared.errors import InvalidTransition
from shared.identity import ensure_account, set_membership, upsert_user
from shared.models import ExportJob, ExportState, ExportTransition, Role
from tests.support.jobs import attempt_key, make_job


@pytest.fixture(scope="module")
def ids(sessions: sessionmaker[Session]) -> dict[str, int]:
    with transaction(sessions) as session:
        account = ensure_account(session, slug="states")
        other = ensure_account(session, slug="states-other")
        user = upsert_user(session, email="states@example.test", password="long-enough-pw")
        set_membership(session, account=account, user=user, role=Role.ADMIN)
        return {"account": account.id, "other": other.id, "user": user.id}


ALL_PAIRS = list(itertools.product(ExportState, ExportState))


@pytest.mark.parametrize(
    ("source", "target"), [p for p in ALL_PAIRS if p[0] != p[1]], ids=lambda s: s.value
)
def test_database_allows_exactly_the_declared_edges(
    sessions: sessionmaker[Session], ids: dict[str, int], source: ExportState, target: ExportState
) -> None:
    export_id = make_job(sessions, account_id=ids["account"], user_id=ids["user"], state=source)
    allowed = target in lifecycle.TRANSITIONS[source]
    # When any code (here: raw SQL, bypassing shared.lifecycle) changes the state
    statement = text("UPDATE export_jobs SET state = CAST(:to AS export_state) WHERE id = :id")
    if allowed:
        with transaction(sessions) as session:
            session.execute(statement, {"to": target.value, "id": export_id})
        with sessions() as session:
            assert session.get_one(ExportJob, export_id).state is target
    else:
        # Then the trigger refuses every edge that is not in the state machine
        with pytest.raises(DBAPIError) as caught, transaction(sessions) as session:
            session.execute(statement, {"to": target.value, "id": export_id})
        assert getattr(caught.value.orig, "sqlstate", None) == lifecycle.INVALID_TRANSITION_SQLSTATE


@pytest.mark.parametrize("state", [s for s in ExportState if s is not ExportState.QUEUED])
def test_jobs_must_be_born_queued(
    sessions: sessionmaker[Session], ids: dict[str, int], state: ExportState
) -> None:
    with pytest.raises(DBAPIError), transaction(sessions) as session:
        session.execute(
            text(
                "INSERT INTO export_jobs (account_id, requested_by, state, filters, filters_digest,"
                " column_set_version, timezone, max_attempts)"
                " VALUES (:a, :u, CAST(:s AS export_state), '{}', 'x', 1, 'UTC', 3)"
            ),
            {"a": ids["account"], "u": ids["user"], "s": state.value},
        )


def test_python_refuses_undeclared_edges_before_sql(
    sessions: sessionmaker[Session], ids: dict[str, int]
) -> None:
    export_id = make_job(
        sessions, account_id=ids["account"], user_id=ids["user"], state=ExportState.READY
    )
    with pytest.raises(InvalidTransition), transaction(sessions) as session:
        lifecycle.transition(
            session, export_id, to=ExportState.RUNNING, expected=[ExportState.READY], actor="test"
        )


def test_conditional_update_loses_quietly_when_state_moved_on(
    sessions: sessionmaker[Session], ids: dict[str, int]
) -> None:
    export_id = make_job(
        sessions, account_id=ids["account"], user_id=ids["user"], state=ExportState.CANCELED
    )
    with transaction(sessions) as session:
        moved = lifecycle.transition(
            session, export_id, to=ExportState.RUNNING, expected=[ExportState.QUEUED], actor="test"
        )
    assert moved is None


def test_history_records_every_change_with_its_actor(
    sessions: sessionmaker[Session], ids: dict[str, int]
) -> None:
    export_id = make_job(sessions, account_id=ids["account"], user_id=ids["user"])
    with transaction(sessions) as session:
        lifecycle.transition(
            session,
            export_id,
            to=ExportState.CANCELED,
            expected=[ExportState.QUEUED],
            actor="user:7",
            detail="cancel",
        )
    with sessions() as session:
        history = session.scalars(
            select(ExportTransition)
            .where(ExportTransition.export_id == export_id)
            .order_by(ExportTransition.id)
        ).all()
    assert [(h.from_state, h.to_state) for h in history] == [
        (None, ExportState.QUEUED),
        (ExportState.QUEUED, ExportState.CANCELED),
    ]
    assert (history[1].actor, history[1].detail) == ("user:7", "cancel")
    assert history[1].at >= history[0].at


def test_two_workers_racing_for_one_job_claim_it_once(
    sessions: sessionmaker[Session], ids: dict[str, int]
) -> None:
    # Given one queued job and eight threads with their own connections
    export_id = make_job(sessions, account_id=ids["other"], user_id=ids["user"])
    barrier = threading.Barrier(8)
    winners: list[str] = []

    def contender(n: int) -> None:
        barrier.wait()
        with transaction(sessions) as session:
            job = lifecycle.claim(
                session, export_id, worker_id=f"w{n}", lease_seconds=30, attempt_key=attempt_key
            )
            if job is not None:
                winners.append(job.worker_id or "")

    threads = [threading.Thread(target=contender, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then exactly one claim succeeded, with one attempt counted
    assert len(winners) == 1
    with sessions() as session:
        job = session.get_one(ExportJob, export_id)
    assert (job.state, job.attempts, job.worker_id) == (ExportState.RUNNING, 1, winners[0])
    assert job.lease_expires_at is not None and job.started_at is not None


def test_one_running_export_per_account(
    sessions: sessionmaker[Session], ids: dict[str, int]
) -> None:
    with transaction(sessions) as session:
        account = ensure_account(session, slug="states-busy")
    first = make_job(sessions, account_id=account.id, user_id=ids["user"])
    second = make_job(sessions, account_id=account.id, user_id=ids["user"])
    with transaction(sessions) as session:
        assert (
            lifecycle.claim(
                session, first, worker_id="a", lease_seconds=30, attempt_key=attempt_key
            )
            is not None
        )
    with transaction(sessions) as session:
        assert (
            lifecycle.claim(
                session, second, worker_id="b", lease_seconds=30, attempt_key=attempt_key
            )
            is None
        )  # waits its turn
        # a small export made inside a request is not held back
        assert (
            lifecycle.claim(
                session,
                second,
                worker_id="b",
                lease_seconds=30,
                attempt_key=attempt_key,
                exclusive_per_account=False,
            )
            is not None
        )


def test_heartbeat_only_for_the_owner_of_a_running_job(
    sessions: sessionmaker[Session], ids: dict[str, int]
) -> None:
    export_id = make_job(
        sessions,
        account_id=ids["account"],
        user_id=ids["user"],
        state=ExportState.RUNNING,
        worker_id="me",
    )
    with transaction(sessions) as session:
        assert lifecycle.heartbeat(
            session, export_id, worker_id="me", lease_seconds=30, rows_written=10, rows_estimate=100
        )
        assert not lifecycle.heartbeat(
            session,
            export_id,
            worker_id="impostor",
            lease_seconds=30,
            rows_written=1,
            rows_estimate=1,
        )
    with transaction(sessions) as session:  # the user cancels it
        lifecycle.cancel(session, session.get_one(ExportJob, export_id), actor="user:1")
    with transaction(sessions) as session:
        assert not lifecycle.heartbeat(
            session, export_id, worker_id="me", lease_seconds=30, rows_written=20, rows_estimate=100
        )
    with sessions() as session:
        job = session.get_one(ExportJob, export_id)
    assert (job.rows_written, job.rows_estimate) == (10, 100)


def test_claim_respects_the_attempt_budget(
    sessions: sessionmaker[Session], ids: dict[str, int]
) -> None:
    export_id = make_job(sessions, account_id=ids["other"], user_id=ids["user"], attempts=3)
    with transaction(sessions) as session:
        assert (
            lifecycle.claim(
                session, export_id, worker_id="x", lease_seconds=30, attempt_key=attempt_key
            )
            is None
        )


def test_unknown_job_cannot_be_claimed(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        assert (
            lifecycle.claim(
                session, uuid.uuid4(), worker_id="x", lease_seconds=30, attempt_key=attempt_key
            )
            is None
        )
