"""The notifier process: ``python -m services.notifier``.

Consumes ``exports.lifecycle`` and sends the "ready" / "failed" emails (shared/notifications.py).
Stops cleanly on SIGTERM/SIGINT (exit 0); a configuration problem exits 2 with one line on stderr.
"""

from __future__ import annotations

import sys
import threading

from sqlalchemy.orm import Session, sessionmaker

from services import process
from shared.notifications import Notifier
from shared.settings import Settings

#: Database connections the notifier's pool keeps (it handles one event at a time).
POOL_SIZE = 2


def notify(settings: Settings, sessions: sessionmaker[Session], stop: threading.Event) -> None:
    Notifier(settings=settings, sessions=sessions).consumer_loop().run(stop)


def main() -> int:
    """Run the notifier until SIGTERM/SIGINT."""
    return process.run(
        "notifier", required=["kafka_bootstrap_servers"], pool_size=POOL_SIZE, body=notify
    )


if __name__ == "__main__":
    sys.exit(main())
