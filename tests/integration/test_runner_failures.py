"""Every way an attempt can end, against real PostgreSQL and storage: interrupted by Dramatiq
(time limit, shutdown), an unreachable export database, a failed ``_finish``, a snapshot that does
not load, a COPY whose database host silently vanished. Each ends with the heartbeat stopped, a
classified outcome in the database, no file of its own left behind, and counters that agree."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dramatiq.middleware import Shutdown, TimeLimitExceeded, raise_thread_exception
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from services.worker.actors import Actors
from services.worker.maintenance import Maintenance
from shared import lifecycle
from shared.db import transaction
from shared.devstack.ports import free_port
from shared.identity import ensure_account
from shared.models import ErrorClass, ExportState
from shared.runner import ExportRunner, RunOutcome
from shared.settings import Settings
from shared.storage import Storage
from tests.integration.test_runner import files_in, make_runner
from tests.support.jobs import (
    attempt_key,
    events_of,
    failed_with,
    job_of,
    make_job,
    seeded_admin,
    strays_of,
)
from tests.support.storage import FaultyStorage, local_storage
from tests.support.waiting import run_together, wait_until

ORDERS = 20_000
SLUGS = ("fail-a", "fail-b", "fail-c", "fail-d", "fail-e", "fail-f", "fail-g")


@pytest.fixture(scope="module")
def ids(sessions: sessionmaker[Session]) -> dict[str, int]:
    return seeded_admin(sessions, "failures@example.test", [(s, ORDERS, 5) for s in SLUGS])


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def heartbeats_of(export_id: uuid.UUID) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"heartbeat-{export_id}" and t.is_alive()]


def interrupted(
    thread: threading.Thread, results: list[Any], exc: type[BaseException], export_id: uuid.UUID
) -> list[Any]:
    """Raise ``exc`` in the run's thread as Dramatiq does (time limit, shutdown); once the run
    has ended and no heartbeat renews its lease any more: its outcomes."""
    raise_thread_exception(thread.ident, exc)  # type: ignore[arg-type]
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert heartbeats_of(export_id) == []
    return [getattr(r, "outcome", r) for r in results]


def rescue_until_queued(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: Storage,
    actors: Actors,
    export_id: uuid.UUID,
) -> None:
    """Housekeeping's rescue, round after round, until the export is back in the queue."""
    housekeeping = Maintenance(settings=settings, sessions=sessions, storage=storage, actors=actors)

    def rescued() -> bool:
        housekeeping.rescue()
        return job_of(sessions, export_id).state is ExportState.QUEUED

    wait_until(rescued, what=f"export {export_id} to be rescued")


def run_in_thread(runner: ExportRunner, export_id: uuid.UUID) -> tuple[threading.Thread, list[Any]]:
    results: list[Any] = []

    def target() -> None:
        try:
            results.append(runner.run(export_id))
        except BaseException as exc:  # what escaped the runner
            results.append(exc)

    thread = threading.Thread(target=target, name=f"actor-{export_id}")
    thread.start()
    return thread, results


def history(sessions: sessionmaker[Session], export_id: uuid.UUID) -> list[tuple[Any, ...]]:
    with sessions() as session:
        return [
            tuple(row)
            for row in session.execute(
                text(
                    "SELECT from_state, to_state, detail FROM export_transitions"
                    " WHERE export_id = :id ORDER BY id"
                ),
                {"id": export_id},
            )
        ]


def test_time_limit_stops_the_heartbeat_and_fails_the_export_for_good(
    settings: Settings, sessions: sessionmaker[Session], storage: FaultyStorage, ids: dict[str, int]
) -> None:
    # Given an export streaming slowly (would take ~10 s)
    storage.pause = 0.2
    export_id = make_job(sessions, account_id=ids["fail-a"], user_id=ids["user"])
    thread, results = run_in_thread(make_runner(settings, sessions, storage), export_id)
    wait_until(lambda: job_of(sessions, export_id).rows_written > 0, what="rows to stream")
    failures = counter("orders_export_failures_total", reason="time_limit")
    # When Dramatiq's time limit interrupts the actor (the same asynchronous exception)
    # Then the run ends with a classified, final outcome and nothing keeps renewing the lease
    assert interrupted(thread, results, TimeLimitExceeded, export_id) == [RunOutcome.FAILED]
    job = job_of(sessions, export_id)
    assert (job.state, job.error_code, job.error_class, job.lease_expires_at) == (
        ExportState.FAILED,
        "time_limit",
        ErrorClass.USER,
        None,
    )
    assert "Narrow the filters" in (job.error_message or "")
    assert files_in(storage) == []
    assert events_of(sessions, export_id)[-1]["final"] is True
    assert counter("orders_export_failures_total", reason="time_limit") == failures + 1


def test_shutdown_interrupt_hands_the_export_back_without_losing_an_attempt(
    settings: Settings, sessions: sessionmaker[Session], storage: FaultyStorage, ids: dict[str, int]
) -> None:
    storage.pause = 0.2
    export_id = make_job(sessions, account_id=ids["fail-b"], user_id=ids["user"])
    runner = make_runner(settings, sessions, storage)
    thread, results = run_in_thread(runner, export_id)
    wait_until(lambda: job_of(sessions, export_id).rows_written > 0, what="rows to stream")
    assert interrupted(thread, results, Shutdown, export_id) == [RunOutcome.HANDED_BACK]
    job = job_of(sessions, export_id)
    assert (job.state, job.attempts, job.worker_id, job.error_code) == (
        ExportState.QUEUED,
        0,
        None,
        None,
    )
    assert history(sessions, export_id)[-1] == ("running", "queued", "shutdown")
    assert events_of(sessions, export_id)[-1]["type"] == "ExportRequested"  # work is sent again
    assert files_in(storage) == []
    storage.pause = 0
    assert runner.run(export_id).outcome is RunOutcome.READY
    assert job_of(sessions, export_id).attempts == 1


def test_unreachable_export_database_is_retried_with_backoff_then_fails_with_its_own_reason(
    settings: Settings, sessions: sessionmaker[Session], storage: FaultyStorage, ids: dict[str, int]
) -> None:
    # Given an export database nobody listens on
    dead = f"postgresql://orders@127.0.0.1:{free_port()}/orders"
    runner = make_runner(settings, sessions, storage, export_database_url=dead)
    export_id = make_job(sessions, account_id=ids["fail-c"], user_id=ids["user"])
    failures = counter("orders_export_failures_total", reason="database_unavailable")
    retries = counter("orders_export_retries_total")
    # When every attempt fails to connect
    outcomes = [runner.run(export_id) for _ in range(3)]
    # Then each attempt is recorded at once (no wait for the lease), with backoff between them
    assert [r.outcome for r in outcomes] == [RunOutcome.RETRY, RunOutcome.RETRY, RunOutcome.FAILED]
    assert 0 < outcomes[0].delay_seconds < outcomes[1].delay_seconds
    job = job_of(sessions, export_id)
    assert (job.state, job.attempts, job.error_code, job.error_class) == (
        ExportState.FAILED,
        3,
        "database_unavailable",
        ErrorClass.RETRYABLE,
    )
    assert job.error_message == (
        "The database connection was interrupted on every attempt. Retry the export in a few "
        "minutes."
    )
    failed = [e for e in events_of(sessions, export_id) if e["type"] == "ExportFailed"]
    assert [(e["code"], e["final"]) for e in failed] == [("database_unavailable", False)] * 2 + [
        ("database_unavailable", True)
    ]
    assert heartbeats_of(export_id) == []
    # And the counters say what the database says
    assert counter("orders_export_failures_total", reason="database_unavailable") == failures + 3
    assert counter("orders_export_retries_total") == retries + 2


@contextlib.contextmanager
def ready_commit_dropped(sessions: sessionmaker[Session], export_id: uuid.UUID) -> Iterator[None]:
    """A primary that drops the connection of the transaction that marks this job ready."""
    with transaction(sessions) as session:
        session.execute(
            text(
                "CREATE FUNCTION drop_ready() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW; END $$"
            )
        )
        session.execute(
            text(
                "CREATE TRIGGER drop_ready BEFORE UPDATE ON export_jobs FOR EACH ROW"
                f" WHEN (NEW.state = 'ready' AND NEW.id = '{export_id}') EXECUTE FUNCTION"
                " drop_ready()"
            )
        )
    try:
        yield
    finally:
        with transaction(sessions) as session:
            session.execute(text("DROP TRIGGER drop_ready ON export_jobs"))
            session.execute(text("DROP FUNCTION drop_ready()"))


def test_a_failed_finish_is_retried_and_its_file_deleted(
    settings: Settings, sessions: sessionmaker[Session], storage: FaultyStorage, ids: dict[str, int]
) -> None:
    export_id = make_job(sessions, account_id=ids["fail-d"], user_id=ids["user"])
    runner = make_runner(settings, sessions, storage)
    # Given a primary that drops the connection of the transaction that marks this job ready
    with ready_commit_dropped(sessions, export_id):
        failures = counter("orders_export_failures_total", reason="database_unavailable")
        # When the file is stored but _finish fails
        result = runner.run(export_id)
        # Then the attempt is a retryable failure, and the uploaded file is gone
        assert result.outcome is RunOutcome.RETRY
        job = job_of(sessions, export_id)
        assert (job.state, job.error_code, job.attempts, job.storage_key) == (
            ExportState.QUEUED,
            "database_unavailable",
            1,
            None,
        )
        assert files_in(storage) == []
        assert [e["type"] for e in events_of(sessions, export_id)].count("ExportReady") == 0
        assert counter("orders_export_failures_total", reason="database_unavailable") == (
            failures + 1
        )
    assert runner.run(export_id).outcome is RunOutcome.READY
    assert len(files_in(storage)) == 1


def test_a_file_the_attempt_cannot_delete_is_left_to_housekeeping(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: FaultyStorage,
    ids: dict[str, int],
    actors: Actors,
) -> None:
    export_id = make_job(sessions, account_id=ids["fail-e"], user_id=ids["user"])
    # Given an attempt whose file is stored, whose ready commit fails, and whose storage then
    # refuses the delete
    storage.failing_deletes = True
    with ready_commit_dropped(sessions, export_id):
        assert make_runner(settings, sessions, storage).run(export_id).outcome is RunOutcome.RETRY
    assert len(files_in(storage)) == 1
    # Then the file is a recorded stray, and housekeeping deletes it once storage answers
    assert export_id in strays_of(sessions).values()
    storage.failing_deletes = False
    house = Maintenance(settings=settings, sessions=sessions, storage=storage, actors=actors)
    assert house.sweep() >= 1
    assert files_in(storage) == []
    assert export_id not in strays_of(sessions).values()


def test_a_snapshot_that_does_not_load_fails_as_an_engineering_error(
    settings: Settings, sessions: sessionmaker[Session], storage: FaultyStorage, ids: dict[str, int]
) -> None:
    export_id = make_job(sessions, account_id=ids["fail-e"], user_id=ids["user"])
    with transaction(sessions) as session:
        session.execute(
            text("UPDATE export_jobs SET filters = '{\"sort\": 42}' WHERE id = :id"),
            {"id": export_id},
        )
    result = make_runner(settings, sessions, storage).run(export_id)
    assert result.outcome is RunOutcome.FAILED
    failed_with(sessions, export_id, "internal_error", ErrorClass.ENGINEERING)
    assert heartbeats_of(export_id) == []


class FreezableProxy:
    """A TCP proxy to PostgreSQL that can stop forwarding without closing anything: a database
    host that vanished silently (no RST, no FIN), as seen by the client. It forwards slowly
    (~400 kB/s), so little is buffered on the way when it freezes."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream  # the server's Unix socket
        self.frozen = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX)
            try:
                server.connect(self.upstream)
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                data = source.recv(8192)
                if not data:
                    break
                while self.frozen.is_set():
                    time.sleep(0.05)
                target.sendall(data)
                time.sleep(0.02)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.frozen.clear()
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def tcp_postgres(postgres_url: str, database_url: str) -> Iterator[tuple[str, FreezableProxy]]:
    """The test database through a TCP proxy (the embedded server listens on a Unix socket)."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        directory = conn.execute("SELECT current_setting('unix_socket_directories')").fetchone()
        port = conn.info.port
        user = conn.info.user
        name = conn.info.dbname
    assert directory is not None
    proxy = FreezableProxy(f"{directory[0].split(',')[0].strip()}/.s.PGSQL.{port}")
    try:
        yield f"postgresql://{user}@127.0.0.1:{proxy.port}/{name}", proxy
    finally:
        proxy.close()


def test_export_connections_use_tcp_keepalives_and_a_user_timeout(
    tcp_postgres: tuple[str, FreezableProxy],
) -> None:
    from shared.csvfile import ExportQuery

    url, _ = tcp_postgres
    with ExportQuery(database_url=url, statement_timeout_seconds=60) as query:
        sock = socket.socket(fileno=query.fileno())
        try:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) > 0
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) > 0
        finally:
            sock.detach()


def test_a_stalled_copy_lets_its_lease_lapse_and_is_requeued(
    settings: Settings,
    sessions: sessionmaker[Session],
    storage: FaultyStorage,
    ids: dict[str, int],
    actors: Actors,
    tcp_postgres: tuple[str, FreezableProxy],
) -> None:
    url, proxy = tcp_postgres
    lease = {"export_lease_seconds": 3}
    runner = make_runner(settings, sessions, storage, export_database_url=url, **lease)
    export_id = make_job(sessions, account_id=ids["fail-f"], user_id=ids["user"])
    thread, results = run_in_thread(runner, export_id)
    wait_until(lambda: job_of(sessions, export_id).rows_written > 0, what="rows to stream")
    # When the export database host vanishes silently mid-COPY (the primary stays fine)
    proxy.frozen.set()
    # Then the lease follows the missing progress: it lapses and housekeeping requeues the job
    rescue_until_queued(settings.model_copy(update=lease), sessions, storage, actors, export_id)
    job = job_of(sessions, export_id)
    assert (job.error_class, job.attempts) == (ErrorClass.RETRYABLE, 1)
    # And once the stuck connection breaks, the old attempt leaves nothing behind
    proxy.close()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert [getattr(r, "outcome", r) for r in results] == [RunOutcome.CANCELED]
    assert heartbeats_of(export_id) == []
    assert files_in(storage) == []
    storage.pause = 0
    assert make_runner(settings, sessions, storage).run(export_id).outcome is RunOutcome.READY
    assert job_of(sessions, export_id).attempts == 2


class GatedStorage(FaultyStorage):
    """Storage whose upload stops reading after its first chunk until ``gate`` is set: a
    worker frozen mid-export (a long GC pause, a stopped VM) that later wakes up."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.gate = threading.Event()
        self.reading = threading.Event()

    def put(self, key: str, stream: Any) -> int:
        storage = self

        class Gated(io.RawIOBase):
            def readable(self) -> bool:
                return True

            def readinto(self, buffer: Any) -> int:
                if storage.reading.is_set():
                    storage.gate.wait(60)
                storage.reading.set()
                view = memoryview(buffer)[: 64 * 1024]
                return int(stream.readinto(view) or 0)

        if self.gate.is_set():
            return self.inner.put(key, stream)
        return self.inner.put(key, Gated())  # type: ignore[arg-type]


def test_a_rescued_worker_that_wakes_up_leaves_no_file_and_no_second_ready_event(
    settings: Settings,
    sessions: sessionmaker[Session],
    ids: dict[str, int],
    actors: Actors,
    tmp_path: Path,
) -> None:
    inner = local_storage(tmp_path / "files")
    storage = GatedStorage(inner)
    lease = {"export_lease_seconds": 3}
    export_id = make_job(sessions, account_id=ids["fail-g"], user_id=ids["user"])
    # Given a worker frozen mid-upload: no progress, so its lease lapses and it is rescued
    old, results = run_in_thread(make_runner(settings, sessions, storage, **lease), export_id)
    assert storage.reading.wait(30)
    rescue_until_queued(settings.model_copy(update=lease), sessions, storage, actors, export_id)
    # When another worker claims it and completes it
    other = FaultyStorage(inner)
    assert make_runner(settings, sessions, other).run(export_id).outcome is RunOutcome.READY
    ready = job_of(sessions, export_id)
    # And the old worker wakes up and tries to go on
    storage.gate.set()
    old.join(timeout=30)
    assert not old.is_alive()
    # Then the fencing holds: only the new worker's file, one ExportReady, still ready
    assert [getattr(r, "outcome", r) for r in results] == [RunOutcome.CANCELED]
    assert [p.name for p in files_in(storage)] == [Path(ready.storage_key or "").name]
    assert [e["type"] for e in events_of(sessions, export_id)].count("ExportReady") == 1
    after = job_of(sessions, export_id)
    assert (after.state, after.storage_key, after.attempts) == (
        ExportState.READY,
        ready.storage_key,
        2,
    )


def test_racing_claims_keep_one_running_export_per_account(
    settings: Settings, sessions: sessionmaker[Session], ids: dict[str, int]
) -> None:
    from shared.db import make_engine, make_sessionmaker

    racers = 5
    engine = make_engine(settings.database_url, pool_size=racers)
    racing = make_sessionmaker(engine)
    try:
        with transaction(sessions) as session:
            account = ensure_account(session, slug="race-claims", timezone="UTC")
            account_id = account.id
        for _round in range(10):
            queued = [
                make_job(sessions, account_id=account_id, user_id=ids["user"])
                for _ in range(racers)
            ]
            barrier = threading.Barrier(racers)
            claimed: list[uuid.UUID] = []

            def claim(
                export_id: uuid.UUID, barrier: threading.Barrier, claimed: list[uuid.UUID]
            ) -> None:
                with racing() as session, session.begin():
                    barrier.wait()  # every worker claims at the same moment
                    job = lifecycle.claim(
                        session,
                        export_id,
                        worker_id=f"w-{export_id}",
                        lease_seconds=30,
                        attempt_key=attempt_key,
                    )
                    if job is not None:
                        claimed.append(job.id)

            run_together(claim, [(e, barrier, claimed) for e in queued])
            with sessions() as session:
                running = session.scalar(
                    text(
                        "SELECT count(*) FROM export_jobs WHERE account_id = :a"
                        " AND state = 'running'"
                    ),
                    {"a": account_id},
                )
            assert (len(claimed), running) == (1, 1)
            with transaction(sessions) as session:  # finish the round: nothing runs any more
                session.execute(
                    text(
                        "UPDATE export_jobs SET state = 'canceled' WHERE account_id = :a"
                        " AND state IN ('running', 'queued')"
                    ),
                    {"a": account_id},
                )
    finally:
        engine.dispose()
