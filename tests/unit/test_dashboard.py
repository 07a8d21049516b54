"""The "Orders export" Grafana dashboard: a stable uid and panel ids (alerts link to them), one
datasource, and queries only of metrics that exist. (That every query returns data from a real
Prometheus is tests/e2e/test_operations.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.unit.test_metrics_contract import CONTRACT

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "grafana" / "dashboards" / "orders-export.json"
DATASOURCES = REPO_ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
METRIC = re.compile(r"\b((?:orders_export|dramatiq)_[a-z_]+)\b")
#: Dramatiq's Prometheus middleware (dramatiq/middleware/prometheus.py).
DRAMATIQ_METRICS = {
    "dramatiq_messages_total", "dramatiq_message_errors_total", "dramatiq_message_retries_total",
    "dramatiq_message_rejects_total", "dramatiq_messages_inprogress",
    "dramatiq_delayed_messages_inprogress", "dramatiq_message_duration_milliseconds",
}  # fmt: skip
EXTRA_METRICS = {
    "orders_export_consumer_messages_total",
    "orders_export_outbox_published_total",
    "orders_export_outbox_delivery_failures_total",
    "orders_export_consumer_assigned_partitions",
}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def queries() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_stable_uid_title_and_unique_panel_ids() -> None:
    board = dashboard()
    assert board["uid"] == "orders-export" and board["title"] == "Orders export"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    assert "id" not in board  # provisioned dashboards carry no database id


def test_every_panel_queries_the_provisioned_datasource() -> None:
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid


def test_queries_use_only_existing_metrics_and_cover_the_contract() -> None:
    used = {
        re.sub(r"_(bucket|count|sum)$", "", name)
        for expr in queries()
        for name in METRIC.findall(expr)
    }
    known = set(CONTRACT) | DRAMATIQ_METRICS | EXTRA_METRICS
    assert used <= known, used - known
    assert set(CONTRACT) <= used, set(CONTRACT) - used
