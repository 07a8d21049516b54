"""The outbox relay process: ``python -m services.api.relay``.

Publishes the ``outbox`` rows that the API (and workers) write to Kafka. Stops cleanly on
SIGTERM/SIGINT (exit 0); a configuration problem exits 2 with one line on stderr.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

from shared import metrics
from shared.db import make_engine, make_sessionmaker
from shared.errors import ConfigurationError
from shared.outbox import OutboxRelay
from shared.settings import load_settings

log = logging.getLogger("services.api.relay")

#: Exit code for a missing or malformed setting.
EXIT_CONFIGURATION = 2
#: Database connections the relay's pool keeps (it uses one at a time, plus LISTEN's own).
POOL_SIZE = 2


def _stop_on_signals(stop: threading.Event) -> None:
    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


def main() -> int:
    """Run the relay until SIGTERM/SIGINT."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        settings = load_settings()
        settings.require("kafka_bootstrap_servers")
        metrics_server = metrics.serve(settings)
    except ConfigurationError as exc:
        print(f"outbox relay: {exc.message}", file=sys.stderr)
        return EXIT_CONFIGURATION
    engine = make_engine(settings.database_url, pool_size=POOL_SIZE)
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        log.info("outbox relay: started")
        OutboxRelay(settings=settings, sessions=make_sessionmaker(engine)).run(stop)
    finally:
        engine.dispose()
        if metrics_server is not None:
            metrics_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
