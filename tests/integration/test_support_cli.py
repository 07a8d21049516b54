"""``orders-export exports ...`` (support and on-call) against real PostgreSQL, as a process.

Failures are made for real by the export runner over a storage that refuses writes, so the
history, the attempts and the events are the ones production writes.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import backlog, downloads, exports, lifecycle, outbox
from shared.db import transaction
from shared.errors import Conflict, ExportsDisabled
from shared.flags import FlagCache, set_flag
from shared.identity import ensure_account, set_membership, upsert_user
from shared.models import (
    ExportJob,
    ExportState,
    Notification,
    OutboxMessage,
    Role,
    User,
)
from shared.runner import ExportRunner, RunOutcome
from shared.seeding import seed_orders
from shared.settings import Settings
from tests.support.jobs import PATHS, events_of, history_of, job_of, make_job
from tests.support.storage import FaultyStorage, local_storage

ORDERS = 300
RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "runbook.md"


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> FaultyStorage:
    return FaultyStorage(local_storage(Path(tmp_path_factory.mktemp("files"))))


@pytest.fixture(scope="module")
def env(settings: Settings, storage: FaultyStorage) -> dict[str, str]:
    return {
        "DATABASE_URL": settings.database_url,
        "SECRET_KEY": settings.secret_key,
        "STORAGE_URL": Path(storage.inner.root).as_uri(),  # type: ignore[attr-defined]
    }


@pytest.fixture(scope="module")
def ids(sessions: sessionmaker[Session]) -> dict[str, int]:
    with transaction(sessions) as session:
        admin = upsert_user(session, email="ada@support.test", password="long-enough-pw")
        other = upsert_user(session, email="bob@support.test", password="long-enough-pw")
        result = {"admin": admin.id, "other": other.id}
        for slug in ("sup-a", "sup-b"):
            account = ensure_account(session, slug=slug)
            set_membership(session, account=account, user=admin, role=Role.ADMIN)
            set_membership(session, account=account, user=other, role=Role.ADMIN)
            seed_orders(session, account, orders=ORDERS, seed=5)
            result[slug] = account.id
        return result


@pytest.fixture(scope="module")
def runner(
    settings: Settings, sessions: sessionmaker[Session], storage: FaultyStorage
) -> ExportRunner:
    return ExportRunner(
        settings=settings, sessions=sessions, storage=storage, flags=FlagCache(sessions, max_age=0)
    )


@pytest.fixture(autouse=True)
def settle(sessions: sessionmaker[Session]) -> Iterator[None]:
    """Leave no export running: one running export of an account holds back its others."""
    yield
    with transaction(sessions) as session:
        running = session.scalars(
            select(ExportJob.id).where(ExportJob.state == ExportState.RUNNING)
        )
        for export_id in list(running):
            lifecycle.transition(
                session, export_id, to=ExportState.CANCELED, expected=[ExportState.RUNNING],
                actor="test",
            )  # fmt: skip


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def cli_json(env: dict[str, str], *args: str) -> Any:
    result = cli(env, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


#: Makes an export of an account for a user (keys of ``ids``) whose three attempts all failed to
#: store the file; its id.
FailedExport = Callable[[str, str], uuid.UUID]


@pytest.fixture
def failed_export(
    runner: ExportRunner,
    storage: FaultyStorage,
    sessions: sessionmaker[Session],
    ids: dict[str, int],
) -> FailedExport:
    def make(account: str, user: str) -> uuid.UUID:
        export_id = make_job(sessions, account_id=ids[account], user_id=ids[user])
        storage.failing = True
        try:
            outcomes = [runner.run(export_id).outcome for _ in range(3)]
        finally:
            storage.failing = False
        assert outcomes == [RunOutcome.RETRY, RunOutcome.RETRY, RunOutcome.FAILED]
        return export_id

    return make


def runbook_anchors() -> set[str]:
    headings = re.findall(r"^## (.+)$", RUNBOOK.read_text(), re.M)
    return {
        "docs/runbook.md#" + re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in headings
    }


def test_every_exports_command_has_help(env: dict[str, str]) -> None:
    top = cli(env, "--help")
    assert top.returncode == 0 and "exports" in top.stdout
    listing = cli(env, "exports", "--help")
    assert listing.returncode == 0
    for action in ("list", "show", "retry", "cancel", "delete-file", "stats"):
        assert action in listing.stdout
        result = cli(env, "exports", action, "--help")
        assert result.returncode == 0, action
        assert result.stdout.startswith(f"usage: orders-export exports {action}")
    assert "--as NAME" in cli(env, "exports", "retry", "--help").stdout


def test_show_tells_a_real_failure_attempt_by_attempt(
    env: dict[str, str],
    failed_export: FailedExport,
    sessions: sessionmaker[Session],
    ids: dict[str, int],
) -> None:
    # Given an export that failed three times to store its file, an email that could not be
    # delivered, and a refused download
    export_id = failed_export("sup-a", "admin")
    with transaction(sessions) as session:
        session.add(
            Notification(
                export_id=export_id, kind="failed", recipient="ada@support.test",
                event_id="e-1", attempts=2, last_error="SMTP delivery failed: OSError",
            )
        )  # fmt: skip
        downloads.record(
            session,
            export_id=str(export_id),
            user_id=ids["other"],
            outcome=downloads.DownloadOutcome.FILE_EXPIRED,
            client_ip="127.0.0.9",
        )
    # When support asks about it
    body = cli_json(env, "exports", "show", str(export_id))
    # Then every attempt is there with its worker, times, outcome and error
    export = body["export"]
    assert (export["id"], export["account"], export["state"]) == (str(export_id), "sup-a", "failed")
    assert export["requester"] == {"id": ids["admin"], "email": "ada@support.test"}
    assert export["options"] == {"utf8_bom": False} and export["filters"]["sort"] == "-placed_at"
    attempts = body["attempts"]
    assert [a["number"] for a in attempts] == [1, 2, 3]
    assert [a["outcome"] for a in attempts] == ["retry", "retry", "failed"]
    assert len({a["worker_id"] for a in attempts}) == 3
    for attempt in attempts:
        assert attempt["worker_id"] and not attempt["worker_id"].startswith("worker:")
        assert attempt["started_at"] <= attempt["ended_at"]
        assert attempt["ended_by"] == f"worker:{attempt['worker_id']}"
        assert attempt["error"]["code"] == "storage_unavailable"
        assert attempt["error"]["class"] == "retryable"
    assert (
        attempts[0]["error"]["message"]
        == "The file could not be stored. The export will be retried."
    )
    assert attempts[2]["error"]["message"] == export["error"]["message"]
    assert export["error"] == {
        "code": "storage_unavailable",
        "class": "retryable",
        "message": (
            "The file could not be stored on any attempt. Retry the export in a few minutes."
        ),
    }
    # And the history, the events (not published: no relay runs here), emails and downloads
    assert [(h["from"], h["to"]) for h in body["history"]] == [
        (None, "queued"), ("queued", "running"), ("running", "queued"), ("queued", "running"),
        ("running", "queued"), ("queued", "running"), ("running", "failed"),
    ]  # fmt: skip
    assert body["history"][-1]["detail"] == "storage_unavailable"
    types = [e["type"] for e in body["events"]]
    assert types == ["ExportStarted", "ExportFailed"] * 3
    assert not any(e["published"] for e in body["events"])
    assert body["emails"] == [
        {
            "kind": "failed", "recipient": "ada@support.test", "status": "pending",
            "attempts": 2, "last_error": "SMTP delivery failed: OSError",
            "created_at": body["emails"][0]["created_at"], "sent_at": None,
        }
    ]  # fmt: skip
    assert body["downloads"][0]["outcome"] == "file_expired"
    assert body["downloads"][0]["user"] == {"id": ids["other"], "email": "bob@support.test"}
    assert any("notifierfailing" in note["runbook"] for note in body["notes"])
    # And the verdict: the user can retry later
    assert body["verdict"]["verdict"] == "user_can_fix" and body["verdict"]["runbook"] is None
    text = cli(env, "exports", "show", str(export_id))
    assert text.returncode == 0
    assert "verdict: user can fix (storage_unavailable: " in text.stdout
    assert "#3  worker " in text.stdout and "NOT published" in text.stdout


def test_show_sends_engineering_to_the_runbook_section(
    env: dict[str, str], sessions: sessionmaker[Session], ids: dict[str, int]
) -> None:
    export_id = make_job(
        sessions, account_id=ids["sup-b"], user_id=ids["admin"], state=ExportState.FAILED,
        error_code="internal_error", error_class="engineering",
        error_message="An unexpected error stopped the export. Please contact support.",
    )  # fmt: skip
    body = cli_json(env, "exports", "show", str(export_id))
    assert body["verdict"]["verdict"] == "needs_engineering"
    assert body["verdict"]["runbook"] == "docs/runbook.md#ordersexportjobsfailing"
    assert body["verdict"]["runbook"] in runbook_anchors()
    text = cli(env, "exports", "show", str(export_id)).stdout
    assert "verdict: needs engineering" in text
    assert "open docs/runbook.md#ordersexportjobsfailing" in text


def test_show_of_an_unknown_or_malformed_id(env: dict[str, str]) -> None:
    unknown = cli(env, "exports", "show", str(uuid.uuid4()))
    assert unknown.returncode == 3 and "no export" in unknown.stderr
    malformed = cli(env, "exports", "show", "not-an-id")
    assert malformed.returncode == 2 and "not an export id" in malformed.stderr


def test_list_filters_newest_first(
    env: dict[str, str], sessions: sessionmaker[Session], ids: dict[str, int]
) -> None:
    made = {
        state: make_job(sessions, account_id=ids["sup-b"], user_id=ids["other"], state=state)
        for state in (ExportState.QUEUED, ExportState.READY, ExportState.CANCELED)
    }
    with transaction(sessions) as session:  # one of them is old
        session.execute(
            update(ExportJob)
            .where(ExportJob.id == made[ExportState.CANCELED])
            .values(created_at=func.now() - func.make_interval(0, 0, 0, 3))
        )
    listed = cli_json(env, "exports", "list", "--account", "sup-b")["exports"]
    created = [e["created_at"] for e in listed]
    assert created == sorted(created, reverse=True)
    assert {e["account"] for e in listed} == {"sup-b"}
    assert set(listed[0]) == {
        "id", "account", "state", "requester", "created_at", "row_count", "rows_written",
        "attempts", "error_code",
    }  # fmt: skip
    two = cli_json(
        env, "exports", "list", "--account", "sup-b", "--state", "queued", "--state", "canceled"
    )["exports"]
    assert {e["id"] for e in two} >= {
        str(made[ExportState.QUEUED]),
        str(made[ExportState.CANCELED]),
    }
    assert {e["state"] for e in two} <= {"queued", "canceled"}
    recent = {e["id"] for e in cli_json(env, "exports", "list", "--since", "2d")["exports"]}
    assert str(made[ExportState.QUEUED]) in recent and str(made[ExportState.CANCELED]) not in recent
    assert len(cli_json(env, "exports", "list", "--limit", "1")["exports"]) == 1
    text = cli(env, "exports", "list", "--account", "sup-b", "--state", "ready").stdout.splitlines()
    assert text and all(" ready " in line and "bob@support.test" in line for line in text)
    assert text[0].startswith(str(made[ExportState.READY]))
    assert cli(env, "exports", "list", "--account", "nope").returncode == 3
    assert cli(env, "exports", "list", "--state", "lost").returncode == 2
    assert cli(env, "exports", "list", "--since", "yesterday").returncode == 2
    assert cli(env, "exports", "list", "--limit", "0").returncode == 2


def _api_outcome(
    sessions: sessionmaker[Session], settings: Settings, export_id: uuid.UUID, user_id: int,
    action: str,
) -> str:  # fmt: skip
    """What the API's use case does with the export (rolled back: only the answer counts)."""
    # The per-user cap is the user path's own rule (support acts for nobody): out of the way.
    settings = settings.model_copy(update={"export_max_active_per_user": 1000})
    with sessions() as session:
        try:
            return _act_as_user(session, settings, export_id, user_id, action)
        finally:
            session.rollback()


def _act_as_user(
    session: Session, settings: Settings, export_id: uuid.UUID, user_id: int, action: str
) -> str:
    user = session.get_one(User, user_id)
    flags = FlagCache(sessionmaker(bind=session.get_bind()), max_age=0)
    try:
        if action == "retry":
            exports.retry(
                session, settings=settings, flags=flags, export_id=str(export_id), user=user
            )
        else:
            exports.cancel(session, export_id=str(export_id), user=user)
    except (Conflict, ExportsDisabled) as exc:
        return f"refused: {exc.message}"
    return "ok"


@pytest.mark.parametrize("action", ["retry", "cancel"])
def test_retry_and_cancel_follow_the_apis_rules_in_every_state(
    env: dict[str, str],
    settings: Settings,
    sessions: sessionmaker[Session],
    ids: dict[str, int],
    action: str,
) -> None:
    for state in PATHS:
        # Given two identical exports in the same state, one for the API and one for support
        api_job = make_job(sessions, account_id=ids["sup-a"], user_id=ids["other"], state=state)
        cli_job = make_job(sessions, account_id=ids["sup-a"], user_id=ids["other"], state=state)
        # When the admin acts through the API's use case and support through the command
        expected = _api_outcome(sessions, settings, api_job, ids["other"], action)
        result = cli(env, "exports", action, str(cli_job), "--as", "alice")
        # Then both are allowed, or both refused with the same words (exit status 4)
        if expected == "ok":
            assert result.returncode == 0, (state, result.stderr)
            after = job_of(sessions, cli_job).state
            assert result.stdout.strip() == (
                f"export {cli_job}: {state} -> {after} (by support:alice)"
            )
            assert history_of(sessions, cli_job)[-1] == (after, "support:alice", action)
            assert job_of(sessions, cli_job).requested_by == ids["other"]
        else:
            assert (result.returncode, result.stderr.strip()) == (
                4,
                f"orders-export: {expected}",
            ), state
            assert job_of(sessions, cli_job).state is state


def test_support_retry_queues_the_work_and_respects_the_switch(
    env: dict[str, str],
    failed_export: FailedExport,
    runner: ExportRunner,
    sessions: sessionmaker[Session],
    ids: dict[str, int],
) -> None:
    export_id = failed_export("sup-b", "admin")
    with transaction(sessions) as session:
        set_flag(session, "exports_enabled", False)
    try:
        off = cli(env, "exports", "retry", str(export_id))
    finally:
        with transaction(sessions) as session:
            set_flag(session, "exports_enabled", True)
    assert off.returncode == 4 and "exports are switched off" in off.stderr
    assert job_of(sessions, export_id).state is ExportState.FAILED
    # Without --as, the OS user is the actor
    assert cli(env, "exports", "retry", str(export_id)).returncode == 0
    assert history_of(sessions, export_id)[-1] == (
        ExportState.QUEUED, f"support:{getpass.getuser()}", "retry",
    )  # fmt: skip
    job = job_of(sessions, export_id)
    assert (job.attempts, job.error_code, job.requested_by) == (0, None, ids["admin"])
    assert events_of(sessions, export_id)[-1]["type"] == "ExportRequested"
    # And the work runs to the end
    assert runner.run(export_id).outcome is RunOutcome.READY
    assert cli(env, "exports", "retry", str(export_id), "--as", "no spaces").returncode == 2


def test_support_deletes_a_ready_file(
    env: dict[str, str],
    runner: ExportRunner,
    storage: FaultyStorage,
    sessions: sessionmaker[Session],
    ids: dict[str, int],
) -> None:
    export_id = make_job(sessions, account_id=ids["sup-a"], user_id=ids["admin"])
    assert runner.run(export_id).outcome is RunOutcome.READY
    key = job_of(sessions, export_id).storage_key
    assert key is not None and storage.exists(key)
    result = cli(env, "exports", "delete-file", str(export_id), "--as", "carol")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"export {export_id}: ready -> expired (by support:carol)"
    assert not storage.exists(key)
    assert job_of(sessions, export_id).state is ExportState.EXPIRED
    assert history_of(sessions, export_id)[-1] == (ExportState.EXPIRED, "support:carol", "deleted")
    event = events_of(sessions, export_id)[-1]
    assert (event["type"], event["reason"], event["deleted_by"]) == (
        "ExportExpired",
        "deleted",
        None,
    )
    again = cli(env, "exports", "delete-file", str(export_id), "--as", "carol")
    assert again.returncode == 4
    assert "only ready exports have a file to delete (this one is expired)" in again.stderr
    missing = cli(env, "exports", "delete-file", str(uuid.uuid4()))
    assert missing.returncode == 3


def test_stats_are_the_dashboards_numbers(
    env: dict[str, str],
    settings: Settings,
    failed_export: FailedExport,
    sessions: sessionmaker[Session],
    ids: dict[str, int],
) -> None:
    # Given a failed export whose email could not be sent twice, and a queued one
    failed = failed_export("sup-b", "other")
    with transaction(sessions) as session:
        session.add(
            Notification(
                export_id=failed, kind="failed", recipient="bob@support.test", event_id="e-2",
                attempts=2, last_error="SMTP delivery failed: OSError",
            )
        )  # fmt: skip
    make_job(sessions, account_id=ids["sup-b"], user_id=ids["other"])
    # When on-call asks for the figures
    body = cli_json(env, "exports", "stats", "--since", "1h")
    # Then they are the worker's own reading of the gauges, and the tables themselves
    with transaction(sessions) as session:
        gauges = backlog.read_jobs(session, stalled_after_seconds=settings.export_lease_seconds)
    with sessions() as session:
        per_state = dict(
            session.execute(select(ExportJob.state, func.count()).group_by(ExportJob.state)).all()
        )
        failed_events = session.scalar(
            select(func.count()).where(OutboxMessage.payload["type"].astext == "ExportFailed")
        )
        pending = outbox.pending_count(session)
    assert body["jobs"]["per_state"] == dict(gauges.per_state)
    assert body["jobs"]["per_state"] == {s.value: per_state.get(s, 0) for s in ExportState}
    assert body["jobs"]["stalled"] == gauges.stalled
    assert body["jobs"]["oldest_queued_seconds"] > 0
    assert body["outbox"]["pending"] == gauges.outbox_pending == pending
    assert body["outbox"]["oldest_pending_seconds"] > 0
    # The counters: every failed attempt of the window, by error code
    codes = body["failed_attempts"]["by_error_code"]
    assert sum(codes.values()) == failed_events and codes["storage_unavailable"] >= 3
    assert body["failed_exports"]["by_error_code"]["storage_unavailable"] >= 1
    assert body["emails"]["pending"] >= 1 and body["emails"]["failed_deliveries"] >= 2
    text = cli(env, "exports", "stats").stdout
    assert "exports per state: queued" in text and "storage_unavailable" in text
    assert cli(env, "exports", "stats", "--since", "0m").returncode == 2
