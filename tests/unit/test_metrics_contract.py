"""The metric names and labels are a contract (docs/contract.md): dashboards and alerts use
them. The exposition of a process must carry exactly these names and labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shared import metrics
from shared.downloads import DownloadOutcome
from shared.metrics import Backlog, BacklogCollector, JobsSnapshot
from shared.settings import Settings

#: name -> label names, from docs/contract.md (plus the gauges this issue adds).
CONTRACT: dict[str, set[str]] = {
    "orders_export_jobs": {"state"},
    "orders_export_queue_depth": {"queue"},
    "orders_export_oldest_queued_seconds": set(),
    "orders_export_job_duration_seconds": {"outcome"},
    "orders_export_queue_wait_seconds": set(),
    "orders_export_rows_total": set(),
    "orders_export_bytes_total": set(),
    "orders_export_failures_total": {"reason"},
    "orders_export_retries_total": set(),
    "orders_export_downloads_total": {"outcome"},
    "orders_export_notifications_total": {"kind", "outcome"},
    "orders_export_outbox_pending": set(),
    "orders_export_consumer_lag": {"group", "topic"},
    "orders_export_stalled_jobs": set(),
    "orders_export_outbox_oldest_pending_seconds": set(),
}
#: The download outcomes the contract lists.
DOWNLOAD_OUTCOMES = {
    "ok", "unauthenticated", "forbidden", "not_found", "bad_signature", "link_expired",
    "file_expired",
}  # fmt: skip


def exposed() -> dict[str, set[str]]:
    """Every sample name the exposition carries, with its label names."""
    metrics.FAILURES.labels("storage_unavailable")
    metrics.DOWNLOADS.labels("ok")
    metrics.NOTIFICATIONS.labels("ready", "sent")
    metrics.JOB_DURATION.labels("ready")
    backlog = Backlog(
        jobs=JobsSnapshot(
            per_state={"queued": 1}, oldest_queued_seconds=3.0, stalled=0,
            outbox_pending=2, outbox_oldest_pending_seconds=1.0,
        ),
        queue_depth={"exports": 1, "exports.DQ": 0},
        consumer_lag={("orders-export-worker", "exports.requested"): 0},
    )  # fmt: skip
    settings = Settings(database_url="postgresql://u@h/d", secret_key="0123456789abcdef")
    registry = metrics.exposition_registry(settings, BacklogCollector(lambda: backlog))
    text = generate_latest(registry).decode()
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(set(sample.labels) - {"le"})
    return found


def test_the_exposition_has_every_contract_name_with_its_labels() -> None:
    found = exposed()
    for name, labels in CONTRACT.items():
        candidates = {n for n in found if n == name or n == f"{name}_count"}
        assert candidates, f"{name} is not exposed"
        for candidate in candidates:
            assert found[candidate] == labels, (name, found[candidate])


def test_download_outcomes_are_the_contract_values() -> None:
    assert {outcome.value for outcome in DownloadOutcome} == DOWNLOAD_OUTCOMES


def test_an_empty_backlog_exposes_no_backlog_gauges() -> None:
    registry = CollectorRegistry()
    registry.register(BacklogCollector(Backlog))
    assert generate_latest(registry) == b""
