"""The notifier process: ``python -m services.notifier``.

Consumes ``exports.lifecycle`` and sends the "ready" / "failed" emails (shared/notifications.py).
Stops cleanly on SIGTERM/SIGINT (exit 0); a configuration problem exits 2 with one line on stderr.
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
from shared.notifications import Notifier
from shared.settings import load_settings

log = logging.getLogger("services.notifier")

#: Exit code for a missing or malformed setting.
EXIT_CONFIGURATION = 2
#: Database connections the notifier's pool keeps (it handles one event at a time).
POOL_SIZE = 2


def _stop_on_signals(stop: threading.Event) -> None:
    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


def main() -> int:
    """Run the notifier until SIGTERM/SIGINT."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        settings = load_settings()
        settings.require("kafka_bootstrap_servers")
        engine = make_engine(settings.database_url, pool_size=POOL_SIZE)
        notifier = Notifier(settings=settings, sessions=make_sessionmaker(engine))
        metrics_server = metrics.serve(settings)
    except ConfigurationError as exc:
        print(f"notifier: {exc.message}", file=sys.stderr)
        return EXIT_CONFIGURATION
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        log.info("notifier: started")
        notifier.consumer_loop().run(stop)
    finally:
        engine.dispose()
        if metrics_server is not None:
            metrics_server.stop()
    return 0
