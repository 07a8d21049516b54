"""Each counter and histogram moves for the event it counts, against real PostgreSQL, storage,
SMTP and the real API; and the multi-process exposition adds up processes.

Metrics are process-wide, so every test compares a value before and after its event.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from services.api.app import create_app
from shared.db import transaction
from shared.devstack.children import python_env
from shared.devstack.mailsink import MailSink
from shared.devstack.ports import free_port
from shared.events import ExportReady
from shared.flags import FlagCache
from shared.identity import create_token, ensure_account, set_membership, upsert_user
from shared.models import ExportJob, ExportState, ExportTransition, Role
from shared.notifications import NotificationFailed, Notifier
from shared.runner import ExportRunner, RunOutcome
from shared.seeding import seed_orders
from shared.settings import Settings
from shared.signing import SigningKeys, download_path
from shared.storage import Storage
from tests.support.jobs import make_job
from tests.support.storage import FaultyStorage, local_storage

ORDERS = 400


def value(name: str, **labels: str) -> float:
    """The current value of a sample in this process (0 when it does not exist yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Counts:
    """Samples read before an event, to compare with after it."""

    def __init__(self, *samples: tuple[str, dict[str, str]]) -> None:
        self._before = {
            (name, tuple(sorted(labels.items()))): value(name, **labels) for name, labels in samples
        }

    def delta(self, name: str, **labels: str) -> float:
        return value(name, **labels) - self._before[(name, tuple(sorted(labels.items())))]


def failing_storage(inner: Storage) -> FaultyStorage:
    """Local storage whose writes fail, like an object store that is down."""
    storage = FaultyStorage(inner)
    storage.failing = True
    return storage


@pytest.fixture(scope="module")
def people(sessions: sessionmaker[Session]) -> dict[str, Any]:
    with transaction(sessions) as session:
        account = ensure_account(session, slug="metrics", name="Metrics Inc")
        ids: dict[str, Any] = {"account": account.id, "slug": account.slug}
        for role in (Role.ADMIN, Role.MEMBER):
            user = upsert_user(
                session, email=f"{role.value}@metrics.test", password="correct horse battery"
            )
            set_membership(session, account=account, user=user, role=role)
            ids[role.value] = user.id
            ids[f"{role.value}_token"] = create_token(session, user)
        seed_orders(session, account, orders=ORDERS, seed=3)
    return ids


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Storage:
    return local_storage(Path(tmp_path_factory.mktemp("files")))


def runner_with(
    settings: Settings, sessions: sessionmaker[Session], storage: Storage
) -> ExportRunner:
    return ExportRunner(
        settings=settings, sessions=sessions, storage=storage, flags=FlagCache(sessions)
    )


@pytest.fixture
def export_id(sessions: sessionmaker[Session], people: dict[str, Any]) -> uuid.UUID:
    """A new queued export of the account's admin."""
    return make_job(sessions, account_id=people["account"], user_id=people["admin"])


@pytest.fixture
def runner(settings: Settings, sessions: sessionmaker[Session], storage: Storage) -> ExportRunner:
    return runner_with(settings, sessions, storage)


def test_a_ready_run_counts_rows_bytes_its_duration_and_its_queue_wait(
    runner: ExportRunner, export_id: uuid.UUID, sessions: sessionmaker[Session]
) -> None:
    counts = Counts(
        ("orders_export_rows_total", {}),
        ("orders_export_bytes_total", {}),
        ("orders_export_job_duration_seconds_count", {"outcome": "ready"}),
        ("orders_export_queue_wait_seconds_count", {}),
        ("orders_export_queue_wait_seconds_sum", {}),
    )

    assert runner.run(export_id).outcome is RunOutcome.READY

    with sessions() as session:
        job = session.get_one(ExportJob, export_id)
    assert counts.delta("orders_export_rows_total") == job.row_count == ORDERS
    assert counts.delta("orders_export_bytes_total") == job.size_bytes
    assert counts.delta("orders_export_job_duration_seconds_count", outcome="ready") == 1
    assert counts.delta("orders_export_queue_wait_seconds_count") == 1
    assert 0 <= counts.delta("orders_export_queue_wait_seconds_sum") < 60


def test_the_queue_wait_counts_from_when_the_job_last_entered_the_queue(
    runner: ExportRunner, export_id: uuid.UUID, sessions: sessionmaker[Session]
) -> None:
    now = dt.datetime.now(dt.UTC)
    with transaction(sessions) as session:  # created days ago, back in the queue 90 s ago
        session.execute(
            update(ExportJob)
            .where(ExportJob.id == export_id)
            .values(created_at=now - dt.timedelta(days=3))
        )
        session.execute(
            update(ExportTransition)
            .where(ExportTransition.export_id == export_id)
            .values(at=now - dt.timedelta(seconds=90))
        )
    counts = Counts(("orders_export_queue_wait_seconds_sum", {}))

    assert runner.run(export_id).outcome is RunOutcome.READY

    assert 89 <= counts.delta("orders_export_queue_wait_seconds_sum") < 120


def test_a_failed_attempt_counts_its_reason_and_the_automatic_retry(
    settings: Settings, sessions: sessionmaker[Session], storage: Storage, people: dict[str, Any]
) -> None:
    runner = runner_with(
        settings.model_copy(update={"export_retry_backoff_seconds": 0}),
        sessions,
        failing_storage(storage),
    )
    export_id = make_job(sessions, account_id=people["account"], user_id=people["admin"])
    reason = {"reason": "storage_unavailable"}
    counts = Counts(
        ("orders_export_failures_total", reason),
        ("orders_export_retries_total", {}),
        ("orders_export_job_duration_seconds_count", {"outcome": "retry"}),
        ("orders_export_job_duration_seconds_count", {"outcome": "failed"}),
        ("orders_export_rows_total", {}),
    )

    # When storage is down for every attempt (3 allowed)
    outcomes = [runner.run(export_id).outcome for _ in range(3)]

    # Then each attempt is a failure, the first two are retries, the last one is final
    assert outcomes == [RunOutcome.RETRY, RunOutcome.RETRY, RunOutcome.FAILED]
    assert counts.delta("orders_export_failures_total", **reason) == 3
    assert counts.delta("orders_export_retries_total") == 2
    assert counts.delta("orders_export_job_duration_seconds_count", outcome="retry") == 2
    assert counts.delta("orders_export_job_duration_seconds_count", outcome="failed") == 1
    assert counts.delta("orders_export_rows_total") == 0


def test_an_export_made_inside_a_request_counts_rows_but_is_not_a_worker_run(
    runner: ExportRunner, export_id: uuid.UUID, sessions: sessionmaker[Session]
) -> None:
    counts = Counts(
        ("orders_export_rows_total", {}),
        ("orders_export_job_duration_seconds_count", {"outcome": "ready"}),
        ("orders_export_queue_wait_seconds_count", {}),
    )

    assert runner.run(export_id, inline=True).outcome is RunOutcome.READY

    assert counts.delta("orders_export_rows_total") == ORDERS
    assert counts.delta("orders_export_job_duration_seconds_count", outcome="ready") == 0
    assert counts.delta("orders_export_queue_wait_seconds_count") == 0


@pytest.fixture(scope="module")
def client(
    settings: Settings, people: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    app_settings = settings.model_copy(
        update={"storage_url": Path(tmp_path_factory.mktemp("api-files")).as_uri()}
    )
    with TestClient(create_app(app_settings), base_url="http://127.0.0.1") as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Accept": "application/json"}


def test_every_download_outcome_is_counted_and_served_on_metrics(
    client: TestClient, settings: Settings, sessions: sessionmaker[Session], people: dict[str, Any]
) -> None:
    admin = bearer(people["admin_token"])
    created = client.post(
        f"/api/v1/accounts/{people['slug']}/order-exports", json={"filters": {}}, headers=admin
    )
    assert created.status_code == 201, created.text  # small: made inside the request
    export = created.json()["export"]
    link = urlsplit(export["download_url"])
    path, query = link.path, parse_qs(link.query)
    tampered = f"{path}?expires={query['expires'][0]}&signature={query['signature'][0][:-2]}xx"
    keys = SigningKeys.from_settings(settings)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    expired_link = download_path(
        keys, export_id=export["id"], user_id=people["admin"], expires_at=past
    )
    outcomes = ("ok", "unauthenticated", "forbidden", "not_found", "bad_signature")
    counts = Counts(
        *(("orders_export_downloads_total", {"outcome": o}) for o in (*outcomes, "link_expired"))
    )

    # When the admin downloads, and others try
    assert client.get(f"{path}?{link.query}", headers=admin).status_code == 200
    assert (
        client.get(f"{path}?{link.query}", headers={"Accept": "application/json"}).status_code
        == 401
    )
    member = bearer(people["member_token"])
    assert client.get(f"{path}?{link.query}", headers=member).status_code == 403
    assert (
        client.get(f"/exports/{uuid.uuid4()}/download?{link.query}", headers=admin).status_code
        == 404
    )
    assert client.get(tampered, headers=admin).status_code == 403
    assert client.get(expired_link, headers=admin).status_code == 410

    # Then each refusal is counted under its own outcome
    for outcome in (*outcomes, "link_expired"):
        assert counts.delta("orders_export_downloads_total", outcome=outcome) == 1, outcome
    # And the API serves them, with the outcomes nobody hit yet at 0
    text = client.get("/metrics").text
    assert 'orders_export_downloads_total{outcome="file_expired"}' in text
    assert 'orders_export_downloads_total{outcome="bad_signature"}' in text


def test_a_download_of_an_expired_file_is_counted_as_file_expired(
    client: TestClient, sessions: sessionmaker[Session], people: dict[str, Any]
) -> None:
    admin = bearer(people["admin_token"])
    created = client.post(
        f"/api/v1/accounts/{people['slug']}/order-exports",
        json={"filters": {"status": ["paid"]}},
        headers=admin,
    )
    export = created.json()["export"]
    with transaction(sessions) as session:
        session.execute(
            update(ExportJob)
            .where(ExportJob.id == uuid.UUID(export["id"]))
            .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    counts = Counts(("orders_export_downloads_total", {"outcome": "file_expired"}))

    assert client.get(export["download_url"], headers=admin).status_code == 410

    assert counts.delta("orders_export_downloads_total", outcome="file_expired") == 1


def ready_job(sessions: sessionmaker[Session], people: dict[str, Any]) -> ExportReady:
    export_id = make_job(
        sessions,
        account_id=people["account"],
        user_id=people["admin"],
        state=ExportState.READY,
        row_count=10,
        size_bytes=1000,
        expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=7),
    )
    return ExportReady(
        export_id=str(export_id),
        account=people["slug"],
        requested_by=people["admin"],
        row_count=10,
        size_bytes=1000,
        expires_at=(dt.datetime.now(dt.UTC) + dt.timedelta(days=7)).isoformat(),
        notify=True,
    )


def test_notifications_count_sent_duplicate_and_failed(
    settings: Settings, sessions: sessionmaker[Session], people: dict[str, Any], tmp_path: Path
) -> None:
    sink = MailSink(mail_dir=tmp_path / "mail", ready_file=tmp_path / "mail.ready")
    mail_settings = settings.model_copy(
        update={"smtp_url": sink.start(), "public_url": "http://127.0.0.1:1"}
    )
    try:
        notifier = Notifier(settings=mail_settings, sessions=sessions)
        labels = [{"kind": "ready", "outcome": o} for o in ("sent", "duplicate", "failed")]
        counts = Counts(*(("orders_export_notifications_total", ls) for ls in labels))
        event = ready_job(sessions, people)

        notifier.handle(event)
        notifier.handle(event)  # redelivered

        assert counts.delta("orders_export_notifications_total", kind="ready", outcome="sent") == 1
        assert (
            counts.delta("orders_export_notifications_total", kind="ready", outcome="duplicate")
            == 1
        )
    finally:
        sink.stop()
    # When the mail server is unreachable
    down = Notifier(
        settings=mail_settings.model_copy(update={"smtp_url": f"smtp://127.0.0.1:{free_port()}"}),
        sessions=sessions,
    )
    with pytest.raises(NotificationFailed):
        down.handle(ready_job(sessions, people))
    # A transient failure is retried (and counted by the consumer loop), not "failed": that
    # counts emails given up for good (tests/integration/test_notifier_failures.py).
    assert counts.delta("orders_export_notifications_total", kind="ready", outcome="failed") == 0


def test_values_of_several_processes_add_up_in_multiprocess_mode(tmp_path: Path) -> None:
    """What the API does with several uvicorn workers: each writes its own file, any of them
    serves the sum."""
    directory = tmp_path / "multiproc"
    directory.mkdir()
    env = python_env({**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)})
    increment = textwrap.dedent(
        """
        import sys
        from shared import metrics
        metrics.DOWNLOADS.labels("forbidden").inc(int(sys.argv[2]))
        """
    )
    expose = textwrap.dedent(
        """
        import sys
        from prometheus_client import generate_latest
        from shared.metrics import exposition_registry
        from shared.settings import Settings
        settings = Settings(
            database_url="postgresql://x/y",
            secret_key="0123456789abcdef",
            prometheus_multiproc_dir=sys.argv[1],
        )
        sys.stdout.write(generate_latest(exposition_registry(settings)).decode())
        """
    )

    for amount in ("2", "3"):
        subprocess.run(
            [sys.executable, "-c", increment, str(directory), amount],
            env=env,
            check=True,
            timeout=60,
        )
    served = subprocess.run(
        [sys.executable, "-c", expose, str(directory)],
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    ).stdout

    assert 'orders_export_downloads_total{outcome="forbidden"} 5.0' in served
