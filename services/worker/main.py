"""The worker process: Dramatiq workers for the ``exports`` queue, the Kafka bridge and
housekeeping. ``python -m services.worker``; scale by running more processes."""

from __future__ import annotations

import logging
import sys
import threading

from dramatiq import Broker, Worker
from dramatiq.common import dq_name

from services import process
from services.worker.actors import (
    EXPORTS_QUEUE,
    FAST_QUEUE,
    add_prometheus_middleware,
    declare_actors,
    make_broker,
)
from services.worker.bridge import GROUP_ID, make_bridge
from services.worker.maintenance import Maintenance
from shared import metrics
from shared.backlog import BacklogMonitor
from shared.db import make_engine, make_sessionmaker
from shared.errors import ConfigurationError
from shared.events import TOPIC_LIFECYCLE, TOPIC_REQUESTED
from shared.flags import FlagCache
from shared.notifications import CONSUMER_GROUP as NOTIFIER_GROUP
from shared.runner import ExportRunner
from shared.settings import Settings, load_settings
from shared.storage import lifecycle_days, storage_from_url

log = logging.getLogger("orders_export.worker")

#: After WORKER_SHUTDOWN_GRACE_SECONDS, how long handing running exports back may take (s):
#: the heartbeat notices within a second, cancels the COPY and records ``queued``.
HAND_BACK_SECONDS = 5
#: How long the stop waits for the Kafka bridge, housekeeping and the backlog monitor (s each;
#: they were told to stop at the signal, so they are done by then).
THREAD_JOIN_SECONDS = 2
#: How long an idle Dramatiq consumer waits for an enqueue of this process before it looks in
#: Redis again (ms; what other processes enqueue is seen within this, actors.WakingRedisBroker).
CONSUMER_WAIT_MS = 50


def lane_workers(broker: Broker, settings: Settings) -> tuple[Worker, Worker]:
    """The two Dramatiq workers of the process, not started: the exports queue's own pool
    (exports never starve other background work), and the fast lane (shared/lanes.py), threads
    that only take small exports, so those never wait for a thread a big export holds."""
    worker = Worker(
        broker,
        queues={EXPORTS_QUEUE},
        worker_threads=settings.export_worker_threads,
        worker_timeout=CONSUMER_WAIT_MS,
    )
    broker.logger.addFilter(_SecondLaneWorker())
    fast_worker = Worker(
        broker,
        queues={FAST_QUEUE},
        worker_threads=settings.export_fast_lane_threads,
        worker_timeout=CONSUMER_WAIT_MS,
    )
    return worker, fast_worker


class _SecondLaneWorker(logging.Filter):
    """Drops Dramatiq's warning that a second ``Worker`` adds its middleware to the broker: the
    two lanes do that on purpose, and each Worker consumes only its own queue."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_WorkerMiddleware" not in record.getMessage()


def main() -> int:
    process.configure_logging()
    try:
        settings = load_settings()
        storage = storage_from_url(
            settings.require("storage_url"),
            part_size_mib=settings.storage_part_size_mib,
            expire_days=lifecycle_days(settings.export_file_ttl_seconds),
        )
        settings.require("redis_url")
        settings.require("kafka_bootstrap_servers")
    except ConfigurationError as exc:
        print(f"worker: {exc.message}", file=sys.stderr)
        return process.EXIT_CONFIGURATION
    storage.prepare()
    engine = make_engine(
        settings.database_url,
        pool_size=settings.export_worker_threads + settings.export_fast_lane_threads + 4,
        pool_timeout=settings.database_pool_timeout_seconds,
    )
    sessions = make_sessionmaker(engine)
    runner = ExportRunner(
        settings=settings, sessions=sessions, storage=storage, flags=FlagCache(sessions)
    )
    broker = make_broker(settings)
    if settings.prometheus_multiproc_dir:
        add_prometheus_middleware(broker, multiproc_dir=settings.prometheus_multiproc_dir)
    else:
        log.info("worker: no PROMETHEUS_MULTIPROC_DIR, so no Dramatiq metrics (in-process mode)")
    actors = declare_actors(
        broker,
        runner=runner,
        sessions=sessions,
        statement_timeout_seconds=settings.export_statement_timeout_seconds,
    )
    broker.emit_after("process_boot")  # as the dramatiq command line does in a worker process
    # This process owns the backlog gauges (jobs per state, queue depth, outbox, consumer lag).
    monitor = BacklogMonitor(
        settings=settings,
        sessions=sessions,
        redis_client=broker.client,
        namespace=broker.namespace,
        queues=(EXPORTS_QUEUE, dq_name(EXPORTS_QUEUE), FAST_QUEUE, dq_name(FAST_QUEUE)),
        consumer_groups={GROUP_ID: (TOPIC_REQUESTED,), NOTIFIER_GROUP: (TOPIC_LIFECYCLE,)},
    )
    try:
        metrics_server = metrics.serve(settings, metrics.BacklogCollector(monitor.snapshot))
    except ConfigurationError as exc:
        print(f"worker: {exc.message}", file=sys.stderr)
        broker.close()
        engine.dispose()
        return process.EXIT_CONFIGURATION

    stop = process.stop_on_signals()

    worker, fast_worker = lane_workers(broker, settings)
    worker.start()
    fast_worker.start()
    bridge = make_bridge(settings, actors)
    maintenance = Maintenance(settings=settings, sessions=sessions, storage=storage, actors=actors)
    threads = [
        threading.Thread(target=bridge.run, args=(stop,), name="kafka-bridge", daemon=True),
        threading.Thread(target=maintenance.run, args=(stop,), name="maintenance", daemon=True),
        threading.Thread(target=monitor.run, args=(stop,), name="backlog-monitor", daemon=True),
    ]
    for thread in threads:
        thread.start()
    log.info(
        "worker: started (%d export threads, %d fast-lane threads)",
        settings.export_worker_threads,
        settings.export_fast_lane_threads,
    )
    stop.wait()
    # Stop claiming at once; running exports get the grace, then go back to the queue with their
    # attempt refunded. Whole stop: grace (<= 20 s) + hand-back + joins, within compose's 30 s.
    grace = settings.worker_shutdown_grace_seconds
    log.info("worker: stopping; running exports get %d s, then are handed back", grace)
    hand_back = runner.drain(grace_seconds=grace)
    fast_worker.stop(timeout=(grace + HAND_BACK_SECONDS) * 1000)
    worker.stop(timeout=(grace + HAND_BACK_SECONDS) * 1000)
    hand_back.cancel()
    for thread in threads:
        thread.join(timeout=THREAD_JOIN_SECONDS)
    if metrics_server is not None:
        metrics_server.stop()
    broker.close()
    engine.dispose()
    log.info("worker: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
