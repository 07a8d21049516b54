"""The outbox relay process: ``python -m services.relay``.

Publishes the ``outbox`` rows that the API (and workers) write to Kafka. Stops cleanly on
SIGTERM/SIGINT (exit 0); a configuration problem exits 2 with one line on stderr.
"""

from __future__ import annotations

import sys
import threading

from sqlalchemy.orm import Session, sessionmaker

from services import process
from shared.outbox import OutboxRelay
from shared.settings import Settings

#: Database connections the relay's pool keeps (it uses one at a time, plus LISTEN's own).
POOL_SIZE = 2


def relay(settings: Settings, sessions: sessionmaker[Session], stop: threading.Event) -> None:
    OutboxRelay(settings=settings, sessions=sessions).run(stop)


def main() -> int:
    """Run the relay until SIGTERM/SIGINT."""
    return process.run(
        "outbox relay", required=["kafka_bootstrap_servers"], pool_size=POOL_SIZE, body=relay
    )


if __name__ == "__main__":
    sys.exit(main())
