"""The alert rules with Prometheus' own tools (promtool check / test rules), and their links:
every alert is unit-tested firing and not firing, and points at its runbook section and at a
dashboard panel that shows what it watches."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO_ROOT / "prometheus"
RUNBOOK = REPO_ROOT / "docs" / "runbook.md"
DASHBOARD = REPO_ROOT / "grafana" / "dashboards" / "orders-export.json"
METRIC_NAME = re.compile(r"\b(?:orders_export_[a-z_]+|dramatiq_[a-z_]+|up)\b")


def promtool() -> str:
    """The promtool binary (.ci/run installs Debian's prometheus package); CI must have it."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def run_promtool(*args: str) -> str:
    done = subprocess.run(
        [promtool(), *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_rules_and_config_pass_promtool_check() -> None:
    assert "SUCCESS" in run_promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in run_promtool("check", "config", "prometheus.yml")


def test_alert_unit_tests_pass() -> None:
    assert "SUCCESS" in run_promtool("test", "rules", "alerts_test.yml")


def test_every_alert_has_a_test_where_it_fires_and_one_where_it_does_not() -> None:
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    names = {rule["alert"] for rule in alerts()}
    assert {case["alertname"] for case in cases} == names  # none untested, none unknown
    for name in sorted(names):
        expectations = [case.get("exp_alerts") or [] for case in cases if case["alertname"] == name]
        assert any(expectations), f"{name}: no test where it fires"
        assert not all(expectations), f"{name}: no test where it stays quiet"


def runbook_anchors() -> set[str]:
    headings = re.findall(r"^#{2,3} (.+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-") for heading in headings}


def panels() -> dict[int, dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {panel["id"]: panel for panel in dashboard["panels"]}


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: str(rule["alert"]))
def test_alert_links_its_runbook_section_and_a_dashboard_panel_of_its_metrics(
    rule: dict[str, Any],
) -> None:
    annotations = rule["annotations"]
    assert annotations["summary"] and annotations["description"]
    assert rule["labels"]["severity"] in ("warning", "critical")
    # The runbook has a section for it
    runbook = urlsplit(annotations["runbook_url"])
    assert runbook.path == "docs/runbook.md"
    assert runbook.fragment == rule["alert"].lower()
    assert runbook.fragment in runbook_anchors()
    # The dashboard link opens a panel that queries what the alert looks at
    dashboard = urlsplit(annotations["dashboard_url"])
    assert dashboard.path == "/d/orders-export/orders-export"
    panel = panels()[int(parse_qs(dashboard.query)["viewPanel"][0])]
    queried = {name for target in panel["targets"] for name in METRIC_NAME.findall(target["expr"])}
    assert set(METRIC_NAME.findall(rule["expr"])) & queried, panel["title"]
