"""Child processes of the local stack: started in their own session, stopped by pid.

Every child gets its own process group (so stopping it also stops anything it spawned) and,
on Linux, ``PR_SET_PDEATHSIG``: if the supervisor is killed outright, the kernel sends the child
SIGTERM, so no orphan outlives a ``kill -9`` of ``orders-export dev``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from shared.devstack.errors import ChildExitedError, StartupTimeoutError
from shared.devstack.pids import live_pid_from_file, wait_gone, write_pid_file
from shared.settings import MAX_SHUTDOWN_GRACE_SECONDS

logger = logging.getLogger(__name__)

#: How long a child gets between SIGTERM and SIGKILL (seconds): longer than a worker's longest
#: stop (WORKER_SHUTDOWN_GRACE_SECONDS at its maximum, then handing running exports back), so
#: that stopping the dev stack never kills an export it could still finish or hand back.
STOP_TIMEOUT = MAX_SHUTDOWN_GRACE_SECONDS + 15.0
#: How long to wait for a SIGKILLed process to disappear (seconds).
KILL_TIMEOUT = 5.0
#: How often readiness checks look again (seconds).
POLL_INTERVAL = 0.05
#: File descriptor the children's stdout goes to: our stderr, keeping our stdout for ``ready``.
STDERR_FD = 2
#: Directory holding the ``shared`` and ``services`` packages.
SOURCE_ROOT = Path(__file__).resolve().parents[2]
#: ``prctl`` option that asks for a signal when the parent thread dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when we die (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def python_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: our environment) with this source tree first on ``PYTHONPATH``, so
    ``python -m shared...`` and ``services...`` import in children even when not installed."""
    env = dict(os.environ if base is None else base)
    paths = [str(SOURCE_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def stop_stale(pid_file: Path, *, name: str, timeout: float = STOP_TIMEOUT) -> None:
    """Stop the process a previous run recorded in ``pid_file`` (if it still runs), then
    remove the file. The recorded start time guards against a reused pid."""
    pid = live_pid_from_file(pid_file)
    if pid is not None:
        logger.warning("%s: stopping a leftover process from an earlier run (pid %d)", name, pid)
        _signal_group(pid, signal.SIGTERM)
        if not wait_gone(pid, timeout=timeout):
            _signal_group(pid, signal.SIGKILL)
            wait_gone(pid, timeout=KILL_TIMEOUT)
    pid_file.unlink(missing_ok=True)


class ChildProcess:
    """One subprocess: ``start()`` it, check ``exit_code``, ``stop()`` it by pid."""

    def __init__(
        self,
        *,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        pid_file: Path | None = None,
        stdout: int = STDERR_FD,
    ) -> None:
        self.name = name
        self.argv = tuple(argv)
        self.env = dict(env) if env is not None else None
        self.pid_file = pid_file
        self.stdout = stdout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid once started."""
        return self._process.pid if self._process is not None else None

    @property
    def exit_code(self) -> int | None:
        """None while the child runs (or was never started), else its exit status."""
        return self._process.poll() if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the child in a new session; stop a leftover recorded in the pid file first."""
        if self.pid_file is not None:
            stop_stale(self.pid_file, name=self.name)
        self._process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.stdout,
            start_new_session=True,
            # Runs between fork and exec; the stack starts children from its main thread only.
            preexec_fn=_die_with_parent_hook(),
        )
        if self.pid_file is not None:
            write_pid_file(self.pid_file, self._process.pid)

    def check_running(self) -> None:
        """Raise :class:`ChildExitedError` if the child has exited."""
        code = self.exit_code
        if code is not None:
            raise ChildExitedError(f"{self.name} exited with status {code}")

    def wait_until(self, ready: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Poll ``ready()`` until true; fail early if the child exits, or after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not ready():
            self.check_running()
            if time.monotonic() >= deadline:
                raise StartupTimeoutError(f"{self.name}: no {what} after {timeout:.0f}s")
            time.sleep(POLL_INTERVAL)

    def wait_for_file(self, path: Path, *, timeout: float) -> str:
        """Wait for the child to create ``path`` (written atomically); return its text."""
        self.wait_until(path.exists, timeout=timeout, what=f"ready file {path}")
        return path.read_text().strip()

    def stop(self, *, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM the child's process group, SIGKILL it after ``timeout`` s; return the status.

        Waits until the child is reaped and its group is gone. Safe to call twice.
        """
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s: no exit %.0fs after SIGTERM, sending SIGKILL", self.name, timeout
                )
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(KILL_TIMEOUT)
        # Anything the child left behind in its group goes too.
        _signal_group(process.pid, signal.SIGKILL)
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)
        return process.returncode

    def __repr__(self) -> str:
        return f"ChildProcess(name={self.name!r}, pid={self.pid}, running={self.running})"


class RunsChild:
    """A local server that is one child process: the child once started, stopped on request."""

    _child: ChildProcess | None = None

    @property
    def child(self) -> ChildProcess | None:
        """The running child process, if started."""
        return self._child

    def _stop_child(self) -> None:
        if self._child is not None:
            self._child.stop()
