"""Operations against the live stack (real service processes): the rollout switches take effect
within seconds without a restart, and a real Prometheus server, configured from
prometheus/prometheus.yml and alerts.yml, scrapes every service and answers every query of the
Grafana dashboard after demo traffic."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import pytest
import yaml

from shared.db import make_engine, make_sessionmaker, transaction
from shared.devstack.children import ChildProcess, python_env
from shared.devstack.ports import free_port
from shared.identity import create_token, ensure_account, set_membership, upsert_user
from shared.models import Role
from shared.signing import SigningKeys, download_path
from tests.support.exports import export_of, exports_url, request_export, wait_state
from tests.support.stack import LiveStack, api_client, running
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "grafana" / "dashboards" / "orders-export.json"
#: Demo orders; anything above the threshold is a background job (kept small: fast exports).
ORDERS = 3000
THRESHOLD = 100
#: The switches must apply within this long (seconds; docs/rollout.md: "within 5 seconds").
SWITCH_DEADLINE = 5.0
#: Grafana's range variables, replaced by a concrete range to run a panel's query.
GRAFANA_RANGES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    live = LiveStack(
        Path(tmp_path_factory.mktemp("ops")),
        orders=ORDERS,
        env={"EXPORT_ASYNC_THRESHOLD_ROWS": str(THRESHOLD)},
    )
    yield from running(live)


@pytest.fixture(scope="module")
def api(stack: LiveStack) -> Iterator[httpx2.Client]:
    yield from api_client(stack, {"Accept": "application/json"})


def flags(stack: LiveStack, *args: str) -> str:
    """``orders-export flags ...`` with the stack's environment, as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", "flags", *args],
        env=python_env({**os.environ, **stack.env}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def request(api: httpx2.Client, filters: dict[str, Any]) -> httpx2.Response:
    return api.post(exports_url(), json={"filters": filters})


def ready_export(api: httpx2.Client, filters: dict[str, Any]) -> dict[str, Any]:
    return wait_state(api, request_export(api, filters)["id"], "ready", timeout=60)


def scrape(url: str) -> str:
    return httpx2.get(url, timeout=10, trust_env=False).text


def sample(text: str, name: str, labels: str = "") -> float | None:
    """A sample's value in an exposition text (``labels`` as exposed, e.g. ``state="queued"``)."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return None


# -- rollout switches ------------------------------------------------------------------------


def test_exports_switched_off_refuses_new_requests_and_ready_files_still_download(
    stack: LiveStack, api: httpx2.Client
) -> None:
    # Given a finished export
    ready = ready_export(api, {"status": ["paid"], "channel": ["web"]})
    # When an operator switches exports off (no restart)
    flags(stack, "set", "exports_enabled", "false")
    try:
        switched = time.monotonic()
        refused = wait_for(
            lambda: (r := request(api, {"status": ["refunded"]})).status_code == 503 and r,
            timeout=SWITCH_DEADLINE + 1,
            what="503 for new export requests",
            interval=0.25,
        )
        # Then new requests are refused within seconds
        assert time.monotonic() - switched <= SWITCH_DEADLINE
        assert refused.json()["error"]["code"] == "exports_disabled"
        assert "exports_enabled\tfalse" in flags(stack, "list")
        # And the file that was ready still downloads, as often as needed
        for _ in range(2):
            file = api.get(ready["download_url"])
            assert file.status_code == 200 and file.text.startswith("Order,")
        assert request(api, {"status": ["canceled"]}).status_code == 503
    finally:
        flags(stack, "set", "exports_enabled", "true")
    # When it is switched back on, requests are accepted again within seconds
    switched = time.monotonic()
    wait_for(
        lambda: request(api, {"status": ["pending"]}).status_code in (200, 201, 202),
        timeout=SWITCH_DEADLINE + 1,
        what="export requests accepted again",
        interval=0.25,
    )
    assert time.monotonic() - switched <= SWITCH_DEADLINE


def test_paused_workers_leave_jobs_queued_then_run_them_when_unpaused(
    stack: LiveStack, api: httpx2.Client
) -> None:
    worker_metrics = stack.metrics_url("worker")
    # When an operator pauses the workers (the real worker process, no restart)
    flags(stack, "set", "workers_paused", "true")
    try:
        time.sleep(SWITCH_DEADLINE)  # every process has seen it by now
        response = request(api, {"channel": ["pos"], "sort": "number"})
        assert response.status_code == 202, response.text
        export_id = response.json()["export"]["id"]
        # Then the job stays queued, never attempted, while the queue gauges rise
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            current = export_of(api, export_id)
            assert current["state"] == "queued" and current["attempts"] == 0, current
            time.sleep(0.5)

        def backlog_visible() -> bool:
            text = scrape(worker_metrics)
            queued = sample(text, "orders_export_jobs", 'state="queued"') or 0
            waiting = sum(  # both lanes, each with its delay queue
                sample(text, "orders_export_queue_depth", f'queue="{queue}"') or 0
                for queue in ("exports", "exports.DQ", "exports.fast", "exports.fast.DQ")
            )
            return queued >= 1 and waiting >= 1

        wait_for(backlog_visible, timeout=15, what="queued jobs and queue depth on /metrics")
    finally:
        flags(stack, "set", "workers_paused", "false")
    # When unpaused, the same job completes, in its first attempt
    done = wait_state(api, export_id, "ready", timeout=30)
    assert done["attempts"] == 1


# -- Prometheus -----------------------------------------------------------------------------


class Prometheus:
    """A real Prometheus server (Debian's binary) on a free port, with a temporary config."""

    def __init__(self, root: Path, stack: LiveStack) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            if os.environ.get("CI"):
                pytest.fail("prometheus is missing (apt-get install prometheus)")
            pytest.skip("prometheus is not installed (apt-get install prometheus)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load((REPO_ROOT / "prometheus" / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s",
                            "evaluation_interval": "1s"}  # fmt: skip
        config["rule_files"] = [str(REPO_ROOT / "prometheus" / "alerts.yml")]
        config.pop("alerting")
        for job in config["scrape_configs"]:
            job.pop("dns_sd_configs", None)
            service = job["job_name"].removeprefix("orders-export-")
            target = (
                f"127.0.0.1:{self.port}"
                if service == "prometheus"
                else urlsplit(stack.metrics_url(service)).netloc
            )
            job["static_configs"] = [{"targets": [target]}]
        root.mkdir(parents=True, exist_ok=True)
        config_file = root / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.log = (root / "prometheus.log").open("wb")
        self.child = ChildProcess(
            name="prometheus",
            argv=[
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log.fileno(),
        )

    def start(self) -> Prometheus:
        self.child.start()
        self.child.wait_until(self._ready, timeout=30, what=f"{self.url}/-/ready")
        return self

    def _ready(self) -> bool:
        try:
            return httpx2.get(f"{self.url}/-/ready", timeout=1, trust_env=False).status_code == 200
        except httpx2.HTTPError:
            return False

    def stop(self) -> None:
        self.child.stop()
        self.log.close()

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx2.get(
            f"{self.url}/api/v1/query", params={"query": expr}, timeout=10, trust_env=False
        )
        body = response.json()
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture(scope="module")
def prometheus(stack: LiveStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    server = Prometheus(Path(tmp_path_factory.mktemp("prometheus")), stack)
    try:
        yield server.start()
    finally:
        server.stop()


def member_token(stack: LiveStack) -> str:
    engine = make_engine(stack.database_url, pool_size=1)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            account = ensure_account(session, slug="acme")
            user = upsert_user(session, email="member@acme.test", password="member-password")
            set_membership(session, account=account, user=user, role=Role.MEMBER)
            return create_token(session, user)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def traffic(stack: LiveStack, api: httpx2.Client, prometheus: Prometheus) -> dict[str, Any]:
    """Demo traffic: an export downloaded by its admin, refused downloads (member, altered
    link, expired link) and an export that fails while object storage is down."""
    ready = ready_export(api, {"channel": ["marketplace"]})
    link = urlsplit(ready["download_url"])
    assert api.get(ready["download_url"]).status_code == 200
    member = {"Authorization": f"Bearer {member_token(stack)}", "Accept": "application/json"}
    assert api.get(ready["download_url"], headers=member).status_code == 403
    altered = f"{link.path}?{link.query[:-3]}xyz"
    assert api.get(altered).status_code == 403
    admin_id = stack.sql("SELECT id FROM users WHERE email = 'admin@acme.test'")[0][0]
    expired = download_path(
        SigningKeys.from_settings(stack.settings()),
        export_id=ready["id"],
        user_id=admin_id,
        expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5),
    )
    assert api.get(expired).status_code == 410
    stack.stop_s3()
    try:
        response = request(api, {"channel": ["phone"], "sort": "-total"})
        assert response.status_code == 202, response.text
        failed = wait_state(api, response.json()["export"]["id"], "failed", timeout=90)
    finally:
        stack.start_s3()
    wait_for(lambda: stack.emails_about(failed["id"]), timeout=30, what="the failure email")
    return {"ready": ready, "failed": failed}


def test_each_metric_moves_for_the_event_it_counts(
    prometheus: Prometheus, traffic: dict[str, Any]
) -> None:
    expectations = {
        # the ready export (and the earlier ones of this module)
        "sum(orders_export_rows_total)": 1,
        "sum(orders_export_bytes_total)": 1,
        'sum(orders_export_job_duration_seconds_count{outcome="ready"})': 1,
        "sum(orders_export_queue_wait_seconds_count)": 1,
        'sum(orders_export_notifications_total{kind="ready",outcome="sent"})': 1,
        # the storage outage: two failed attempts, one automatic retry, one failure email
        'sum(orders_export_failures_total{reason="storage_unavailable"})': 2,
        "sum(orders_export_retries_total)": 1,
        'sum(orders_export_job_duration_seconds_count{outcome="failed"})': 1,
        'sum(orders_export_notifications_total{kind="failed",outcome="sent"})': 1,
        # the downloads: the admin's, the member's, the altered link, the expired one
        'sum(orders_export_downloads_total{outcome="ok"})': 1,
        'sum(orders_export_downloads_total{outcome="forbidden"})': 1,
        'sum(orders_export_downloads_total{outcome="bad_signature"})': 1,
        'sum(orders_export_downloads_total{outcome="link_expired"})': 1,
        # the pipeline in between, and Dramatiq's own middleware
        "sum(orders_export_outbox_published_total)": 4,
        'sum(orders_export_consumer_messages_total{outcome="handled"})': 4,
        "sum(dramatiq_messages_total)": 2,
    }

    deadline = time.monotonic() + 30
    while True:  # the last events need a scrape or two (every second) to show
        short = {e: v for e, n in expectations.items() if (v := prometheus.value(e)) < n}
        if not short or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not short, f"below expectation: {short}"


def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    prometheus: Prometheus, traffic: dict[str, Any]
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_RANGES.items():
                expr = expr.replace(variable, value)
            queries[f"{panel['id']} {panel['title']} / {target['refId']}"] = expr
    assert len(queries) >= 20
    # Gauges refresh every 5 s and rate() needs two scrapes: give every query some time.
    deadline = time.monotonic() + 30
    empty = dict(queries)
    while empty and time.monotonic() < deadline:
        empty = {name: expr for name, expr in empty.items() if not prometheus.query(expr)}
        if empty:
            time.sleep(1)
    assert not empty, f"panel queries without data: {empty}"


def test_prometheus_loads_and_evaluates_every_alert_rule(
    prometheus: Prometheus, traffic: dict[str, Any]
) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        response = httpx2.get(f"{prometheus.url}/api/v1/rules", timeout=10, trust_env=False)
        found = [rule for group in response.json()["data"]["groups"] for rule in group["rules"]]
        return found if all(rule["health"] != "unknown" for rule in found) else None

    rules: list[dict[str, Any]] = wait_for(evaluated, timeout=15, what="rule evaluations")
    alerts = yaml.safe_load((REPO_ROOT / "prometheus" / "alerts.yml").read_text())["groups"][0]
    assert {rule["name"] for rule in rules} == {rule["alert"] for rule in alerts["rules"]}
    assert all(rule["health"] == "ok" for rule in rules), rules
    # With every service up, none of the "something is down" alerts is pending or firing
    quiet = (
        "OrdersExportTargetDown",
        "OrdersExportBacklogMetricsMissing",
        "OrdersExportConsumerUnassigned",
    )
    assert all(rule["state"] == "inactive" for rule in rules if rule["name"] in quiet), rules
