"""Prometheus metrics of every service, defined once. Names and labels are a contract for the
dashboard (``grafana/``) and the alert rules (``prometheus/``): docs/contract.md.

Counters and histograms are incremented by the domain code where the event happens. The
gauges that describe waiting work (jobs per state, Dramatiq queue depth, outbox backlog,
consumer lag) are read from PostgreSQL, Redis and Kafka by the worker (``shared/backlog.py``)
and produced at scrape time by :class:`BacklogCollector` from its latest snapshot.

Multi-process collection: when ``PROMETHEUS_MULTIPROC_DIR`` is in a process's environment at
start (prometheus_client decides when it is first imported), every value lives in a file of
that directory and :func:`exposition_registry` adds up the files of all processes sharing it:
the API's uvicorn workers, or the worker and Dramatiq's Prometheus middleware. One directory
per service, empty when the service starts (``orders-export dev`` and docker-compose see to it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from shared.errors import ConfigurationError
from shared.settings import Settings

#: Upper bounds of one export run (seconds): a second for small files, hours for 10M rows.
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
#: Upper bounds of the time a job waits in the queue before a worker claims it (seconds).
WAIT_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# -- counted where it happens (every process that does it) --------------------------------------

JOB_DURATION = Histogram(
    "orders_export_job_duration_seconds",
    "Duration of one background run of an export, by outcome (ready, failed, retry, canceled, "
    "handed_back).",
    ["outcome"],
    buckets=DURATION_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "orders_export_queue_wait_seconds",
    "Time from a job entering the queue to a worker claiming it.",
    buckets=WAIT_BUCKETS,
)
ROWS = Counter("orders_export_rows_total", "CSV rows in finished export files.")
BYTES = Counter("orders_export_bytes_total", "Bytes of finished export files.")
FAILURES = Counter(
    "orders_export_failures_total", "Failed export attempts, by safe error code.", ["reason"]
)
RETRIES = Counter(
    "orders_export_retries_total", "Failed attempts sent back to the queue for an automatic retry."
)
DOWNLOADS = Counter("orders_export_downloads_total", "Download attempts, by outcome.", ["outcome"])
NOTIFICATIONS = Counter(
    "orders_export_notifications_total",
    "Notification emails by kind (ready, failed) and outcome (sent, failed, skipped, duplicate).",
    ["kind", "outcome"],
)
CONSUMED = Counter(
    "orders_export_consumer_messages_total",
    "Kafka messages of a consumer group by outcome (handled, failed, dead_lettered).",
    ["group", "outcome"],
)
CONSUMER_PARTITIONS = Gauge(
    "orders_export_consumer_assigned_partitions",
    "Partitions this process's Kafka consumer of a group holds (0 until the group's first "
    "join has completed, and while a rebalance has taken them away).",
    ["group"],
    multiprocess_mode="livesum",
)
OUTBOX_PUBLISHED = Counter("orders_export_outbox_published_total", "Outbox rows the broker took.")
OUTBOX_DELIVERY_FAILURES = Counter(
    "orders_export_outbox_delivery_failures_total", "Outbox deliveries that failed (retried)."
)

# -- read from PostgreSQL, Redis and Kafka by the worker ----------------------------------------

JOBS = "orders_export_jobs"
QUEUE_DEPTH = "orders_export_queue_depth"
OLDEST_QUEUED = "orders_export_oldest_queued_seconds"
STALLED_JOBS = "orders_export_stalled_jobs"
OUTBOX_PENDING = "orders_export_outbox_pending"
OUTBOX_OLDEST_PENDING = "orders_export_outbox_oldest_pending_seconds"
CONSUMER_LAG = "orders_export_consumer_lag"


def declare(metric: Counter | Histogram, *label_values: Sequence[str]) -> None:
    """Create the series of known label values at zero, so that their first event shows in
    ``rate()``/``increase()`` (a series that appears at 1 has no increase) and panels show 0."""
    for values in label_values:
        metric.labels(*values)


@dataclass(frozen=True, kw_only=True)
class JobsSnapshot:
    """What PostgreSQL says about the jobs and the outbox."""

    per_state: Mapping[str, int]
    oldest_queued_seconds: float
    stalled: int
    outbox_pending: int
    outbox_oldest_pending_seconds: float


@dataclass(frozen=True, kw_only=True)
class Backlog:
    """One reading of the waiting work; a part is None when its source could not be read
    (its gauges are then left out of the scrape rather than reported stale)."""

    jobs: JobsSnapshot | None = None
    #: Dramatiq queue name -> messages not yet done.
    queue_depth: Mapping[str, int] | None = None
    #: (consumer group, topic) -> messages not yet consumed.
    consumer_lag: Mapping[tuple[str, str], int] | None = None


class BacklogCollector(Collector):
    """Produces the backlog gauges from ``snapshot()`` at scrape time (no I/O here)."""

    def __init__(self, snapshot: Callable[[], Backlog]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # names are not checked for clashes: nothing else defines them

    def collect(self) -> Iterator[Metric]:
        backlog = self._snapshot()
        jobs = backlog.jobs
        if jobs is not None:
            per_state = GaugeMetricFamily(JOBS, "Export jobs per state.", labels=["state"])
            for state, count in sorted(jobs.per_state.items()):
                per_state.add_metric([state], count)
            yield per_state
            yield _gauge(
                OLDEST_QUEUED,
                "Age of the job that entered the queue first (0 when none is queued).",
                jobs.oldest_queued_seconds,
            )
            yield _gauge(
                STALLED_JOBS,
                "Running jobs without a heartbeat for longer than their lease.",
                jobs.stalled,
            )
            yield _gauge(OUTBOX_PENDING, "Outbox rows not yet published.", jobs.outbox_pending)
            yield _gauge(
                OUTBOX_OLDEST_PENDING,
                "Age of the oldest unpublished outbox row (0 when none).",
                jobs.outbox_oldest_pending_seconds,
            )
        if backlog.queue_depth is not None:
            depth = GaugeMetricFamily(
                QUEUE_DEPTH,
                "Dramatiq messages in Redis not yet done (waiting, prefetched or running); "
                "<queue>.DQ holds delayed ones (retries, paused workers).",
                labels=["queue"],
            )
            for queue, count in sorted(backlog.queue_depth.items()):
                depth.add_metric([queue], count)
            yield depth
        if backlog.consumer_lag is not None:
            lag = GaugeMetricFamily(
                CONSUMER_LAG,
                "Messages of a topic not yet consumed by a consumer group (high watermark minus "
                "committed offset, summed over partitions).",
                labels=["group", "topic"],
            )
            for (group, topic), count in sorted(backlog.consumer_lag.items()):
                lag.add_metric([group, topic], count)
            yield lag


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class _Forward(Collector):
    """Serves another registry's metrics from a new registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()


def exposition_registry(settings: Settings, *collectors: Collector) -> CollectorRegistry:
    """What this process serves: every process's values in multi-process mode (from the
    directory), else this process's registry, plus ``collectors``."""
    registry = CollectorRegistry(auto_describe=False)
    if settings.prometheus_multiproc_dir:
        MultiProcessCollector(registry, path=settings.prometheus_multiproc_dir)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Forward(REGISTRY))
    for collector in collectors:
        registry.register(collector)
    return registry


class MetricsServer:
    """The HTTP endpoint of a process without a web server of its own."""

    def __init__(self, server: Any, *, port: int) -> None:
        self._server = server
        self.port = port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(settings: Settings, *collectors: Collector) -> MetricsServer | None:
    """Serve ``/metrics`` on METRICS_PORT (in a daemon thread); None when it is 0."""
    if not settings.metrics_port:
        return None
    registry = exposition_registry(settings, *collectors)
    try:
        server, _ = start_http_server(
            settings.metrics_port, addr=settings.metrics_host, registry=registry
        )
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} "
            f"({exc.strerror or type(exc).__name__})"
        ) from None
    return MetricsServer(server, port=settings.metrics_port)
