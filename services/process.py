"""How the long-running services start and stop (relay, notifier, worker): logging,
SIGTERM/SIGINT handling, configuration errors, the metrics endpoint, the pool."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from sqlalchemy.orm import Session, sessionmaker

from shared import metrics
from shared.db import make_engine, make_sessionmaker
from shared.errors import ConfigurationError
from shared.settings import Settings, load_settings

#: Exit status for a missing or malformed setting (one line on stderr says which).
EXIT_CONFIGURATION = 2

log = logging.getLogger(__name__)

Body = Callable[[Settings, sessionmaker[Session], threading.Event], None]


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM or SIGINT sets (the services' only way to stop)."""
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def run(name: str, *, required: Sequence[str], pool_size: int, body: Body) -> int:
    """Run ``body`` until SIGTERM/SIGINT; 0 on a clean stop, 2 on a configuration problem."""
    configure_logging()
    try:
        settings = load_settings()
        for setting in required:
            settings.require(setting)
        metrics_server = metrics.serve(settings)
    except ConfigurationError as exc:
        print(f"{name}: {exc.message}", file=sys.stderr)
        return EXIT_CONFIGURATION
    engine = make_engine(
        settings.database_url,
        pool_size=pool_size,
        pool_timeout=settings.database_pool_timeout_seconds,
    )
    stop = stop_on_signals()
    try:
        log.info("%s: started", name)
        body(settings, make_sessionmaker(engine), stop)
    except ConfigurationError as exc:
        print(f"{name}: {exc.message}", file=sys.stderr)
        return EXIT_CONFIGURATION
    finally:
        engine.dispose()
        if metrics_server is not None:
            metrics_server.stop()
    return 0
