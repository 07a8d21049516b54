"""A real worker process for integration tests, its output kept in a log file."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from shared.devstack.children import python_env


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
