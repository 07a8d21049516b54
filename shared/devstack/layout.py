"""Where the local stack keeps its state inside the data directory (``--data-dir``)."""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from shared.devstack.atomic import write_atomic

#: Random bytes in a generated SECRET_KEY (bytes, before URL-safe base64).
SECRET_KEY_BYTES = 48
#: Permission bits of the generated secret key file (owner read/write only).
SECRET_KEY_FILE_MODE = 0o600


@dataclass(frozen=True, kw_only=True)
class StackLayout:
    """Paths of one stack's state; everything but ``run_dir`` and ``stack_file`` is kept."""

    data_dir: Path

    @classmethod
    def at(cls, data_dir: Path) -> StackLayout:
        """The layout under ``data_dir`` (made absolute)."""
        return cls(data_dir=data_dir.expanduser().resolve())

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"

    @property
    def run_dir(self) -> Path:
        """Pid and ready files of the running stack (stale ones are removed at start)."""
        return self.data_dir / "run"

    @property
    def secret_key_file(self) -> Path:
        return self.data_dir / "secret_key"

    @property
    def stack_file(self) -> Path:
        """``stack.json``: how other processes join the running stack."""
        return self.data_dir / "stack.json"

    def fresh_metrics_dir(self, service: str) -> Path:
        """An empty PROMETHEUS_MULTIPROC_DIR for ``service`` (files of an earlier run go)."""
        path = self.run_dir / "metrics" / service
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def ready_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.ready"

    def create(self) -> None:
        """Create the directories (existing content is kept)."""
        for directory in (self.data_dir, self.run_dir, self.mail_dir, self.storage_dir):
            directory.mkdir(parents=True, exist_ok=True)

    def remove_stale_ready_files(self) -> None:
        """Drop ready files and ``stack.json`` of an earlier run (pid files are checked by
        their owners, which stop the process they name first)."""
        self.stack_file.unlink(missing_ok=True)
        for path in self.run_dir.glob("*.ready"):
            path.unlink(missing_ok=True)

    def secret_key(self) -> str:
        """The key stored in ``secret_key``, generated on first use, so sessions and signed
        links stay valid across restarts."""
        path = self.secret_key_file
        if path.exists():
            key = path.read_text().strip()
            if key:
                return key
        key = secrets.token_urlsafe(SECRET_KEY_BYTES)
        write_atomic(path, key + "\n", mode=SECRET_KEY_FILE_MODE)
        return key
