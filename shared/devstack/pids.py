"""Process ids: liveness, identity and pid files (Linux ``/proc`` where it helps).

A pid file written here holds ``PID START_TICKS``: the kernel's start time of the process in
clock ticks since boot. A pid whose start time differs is a reused number, not our process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from shared.devstack.atomic import write_atomic

#: How often :func:`wait_gone` looks again (seconds).
POLL_INTERVAL = 0.05
#: Process states in ``/proc/PID/stat`` that mean "exited, not yet reaped" or "dead".
_GONE_STATES = frozenset({"Z", "X", "x"})


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name, or None if unavailable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` names a process that has not exited (zombies count as exited)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists but belongs to another user
    fields = _stat_fields(pid)
    if fields is None:
        # Gone between the two looks, or no /proc here (then kill(0) is all we know).
        return not Path("/proc/self/stat").exists()
    return fields[0] not in _GONE_STATES


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is not there."""
    fields = _stat_fields(pid)
    # Field 22 of /proc/PID/stat; fields[0] here is field 3 (the state).
    return int(fields[19]) if fields is not None else None


def command_line(pid: int) -> tuple[str, ...]:
    """The argv of ``pid`` (empty if it is gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ()
    return tuple(part.decode("utf-8", "replace") for part in raw.split(b"\0") if part)


def wait_gone(pid: int, *, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; True if it did."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


def write_pid_file(path: Path, pid: int) -> None:
    """Record ``pid`` together with its start time."""
    write_atomic(path, f"{pid} {start_ticks(pid) or 0}\n")


def live_pid_from_file(path: Path) -> int | None:
    """The pid recorded in ``path`` if that very process still runs, else None."""
    try:
        parts = path.read_text().split()
        pid, ticks = int(parts[0]), int(parts[1])
    except (OSError, ValueError, IndexError):
        return None
    if not pid_alive(pid) or start_ticks(pid) not in (ticks, None):
        return None
    return pid
