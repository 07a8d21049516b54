"""Real service processes for integration tests: a worker with its output in a log file, and
stopping a process as a deploy does (SIGTERM), killing it if it is still there."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from shared.devstack.children import python_env

#: Starts a worker with more settings (environment variables, e.g. ``EXPORT_WORKER_THREADS="2"``)
#: on the test's services: the ``run_worker`` fixture of tests/integration/conftest.py.
WorkerProcess = Callable[..., "subprocess.Popen[bytes]"]


def start_worker(env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m services.worker`` with ``env`` (on top of ours); stdout and stderr go to
    ``log_path``. The caller stops it."""
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "services.worker"],
            env=python_env(dict(env)),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def terminate(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, as a deploy stops a service; its exit status (TimeoutExpired after ``timeout``)."""
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout)


def kill_if_running(process: subprocess.Popen[bytes]) -> None:
    """Whatever happened, leave no process behind."""
    if process.poll() is None:
        process.kill()
        process.wait()
