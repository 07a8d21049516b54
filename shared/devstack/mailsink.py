"""SMTP sink for local runs: every message received on 127.0.0.1 becomes one ``.eml`` file.

``python -m shared.devstack.mailsink --port P --dir DIR --ready-file PATH`` runs an aiosmtpd
server until SIGTERM/SIGINT. Files are named ``<ns since epoch, 20 digits>-<random>.eml`` (sorting
by name sorts by arrival) and written under a hidden temporary name first, so a reader listing
``*.eml`` never sees half a message. Two headers record the envelope: ``X-MailFrom`` and
``X-RcptTo`` (comma separated; includes Bcc recipients). :class:`MailSink` starts it as a child.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from shared.devstack.atomic import write_atomic
from shared.devstack.children import ChildProcess, RunsChild, python_env
from shared.devstack.errors import ChildExitedError, DevStackError
from shared.devstack.ports import LOOPBACK, free_port

#: How long the parent waits for the ready file (seconds).
START_TIMEOUT = 30.0
#: Largest message accepted (bytes).
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
#: Attempts with a fresh port when another process took the one we picked.
PORT_ATTEMPTS = 3
#: Suffix of stored messages.
MESSAGE_SUFFIX = ".eml"


def message_file_name() -> str:
    """A name that sorts by arrival time and is unique: ``<time ns>-<random>.eml``."""
    return f"{time.time_ns():020d}-{secrets.token_hex(4)}{MESSAGE_SUFFIX}"


class EmlDirectoryHandler:
    """aiosmtpd handler that stores each message (envelope headers first) in ``directory``."""

    def __init__(self, *, directory: Path) -> None:
        self.directory = directory

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        recipients = ", ".join(envelope.rcpt_tos)
        headers = f"X-MailFrom: {envelope.mail_from}\r\nX-RcptTo: {recipients}\r\n"
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            content = content.encode("utf-8")
        write_atomic(self.directory / message_file_name(), headers.encode("utf-8") + content)
        return "250 Message accepted for delivery"


def serve(*, port: int, directory: Path, ready_file: Path) -> int:
    """Run the SMTP sink on 127.0.0.1:``port`` until SIGTERM/SIGINT; 0 on a clean stop."""
    from aiosmtpd.controller import Controller

    stopping = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    directory.mkdir(parents=True, exist_ok=True)
    controller = Controller(
        EmlDirectoryHandler(directory=directory),
        hostname=LOOPBACK,
        port=port,
        data_size_limit=MAX_MESSAGE_BYTES,
    )
    controller.start()
    try:
        url = f"smtp://{LOOPBACK}:{port}"
        write_atomic(ready_file, url + "\n")
        print(url, flush=True)
        while not stopping.wait(0.5):
            pass
    finally:
        controller.stop()
        ready_file.unlink(missing_ok=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SMTP sink storing messages as .eml files")
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--dir", type=Path, required=True, help="where to store .eml files")
    parser.add_argument("--ready-file", type=Path, required=True, help="written once listening")
    args = parser.parse_args(argv)
    return serve(port=args.port, directory=args.dir, ready_file=args.ready_file)


class MailSink(RunsChild):
    """Starts ``python -m shared.devstack.mailsink`` as a child and waits until it listens."""

    def __init__(
        self, *, mail_dir: Path, ready_file: Path, pid_file: Path | None = None, port: int = 0
    ) -> None:
        self.mail_dir = mail_dir.resolve()
        self.ready_file = ready_file
        self.pid_file = pid_file
        self.requested_port = port
        self.url: str | None = None

    def start(self) -> str:
        """Start the sink; return its ``smtp://127.0.0.1:PORT`` URL."""
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file.parent.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self.requested_port else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self.ready_file.unlink(missing_ok=True)
            port = self.requested_port or free_port()
            argv = [sys.executable, "-m", "shared.devstack.mailsink", "--port", str(port)]
            argv += ["--dir", str(self.mail_dir), "--ready-file", str(self.ready_file)]
            child = ChildProcess(
                name="mailsink", argv=argv, env=python_env(), pid_file=self.pid_file
            )
            self._child = child
            child.start()
            try:
                self.url = child.wait_for_file(self.ready_file, timeout=START_TIMEOUT)
            except ChildExitedError:
                child.stop()
                if attempt == attempts:
                    raise
            else:
                return self.url
        raise DevStackError("mailsink: no attempt to start it was made")

    def messages(self) -> list[Path]:
        """Stored messages, oldest first."""
        return sorted(self.mail_dir.glob(f"*{MESSAGE_SUFFIX}"))

    def stop(self) -> None:
        """SIGTERM the sink and wait for it; stored messages stay."""
        self._stop_child()
        self.ready_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
