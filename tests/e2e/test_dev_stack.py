"""``orders-export dev`` as a user runs it: ready line, stack.json, CLI and API against it,
a clean SIGTERM that leaves no process behind, and a restart that keeps the data."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import psutil
import psycopg
import pytest

from shared.devstack.stack import JOINED

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
#: How long ``dev`` may take to print its ready line (seconds).
READY_TIMEOUT = 90.0
#: How long ``dev`` may take to stop after SIGTERM (seconds).
STOP_TIMEOUT = 60.0
DEMO_ORDERS = 2000
READY_LINE = re.compile(r"ready (http://127\.0\.0\.1:\d+)")


def cli(*args: str) -> list[str]:
    """The ``orders-export`` command line of this source tree (installed or not)."""
    return [sys.executable, "-m", "shared.cli", *args]


def clean_env() -> dict[str, str]:
    """Our environment without any stack variable, with this tree importable."""
    env = {name: value for name, value in os.environ.items() if name not in JOINED}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def process_alive(pid: int, created: float) -> bool:
    """True if the process ``pid`` that started at ``created`` still runs (zombies are dead)."""
    try:
        process = psutil.Process(pid)
        same = bool(process.create_time() == created)
        return same and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class DevRun:
    """One ``orders-export dev`` subprocess."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.data_dir = data_dir
        self.log = log.open("ab")
        self.process = subprocess.Popen(
            cli(
                "dev", "--port", "0", "--data-dir", str(data_dir), "--demo-orders", str(DEMO_ORDERS)
            ),
            cwd=REPO_ROOT,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        self.tracked: dict[int, float] = {}

    def wait_ready(self) -> str:
        """Read stdout until the ready line; return the API URL."""
        stdout = self.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no ready line after {READY_TIMEOUT:.0f}s; see {self.log.name}"
            readable, _, _ = select.select([stdout], [], [], remaining)
            if not readable:
                continue
            line = stdout.readline().decode()
            assert line, f"dev exited ({self.process.wait()}) before ready; see {self.log.name}"
            match = READY_LINE.fullmatch(line.strip())
            if match is not None:
                return match.group(1)

    def track_processes(self) -> None:
        """Remember every descendant and the postmaster (daemonized, so not a descendant)."""
        for process in psutil.Process(self.process.pid).children(recursive=True):
            self.tracked[process.pid] = process.create_time()
        postmaster = int((self.data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        self.tracked[postmaster] = psutil.Process(postmaster).create_time()

    def survivors(self) -> list[int]:
        deadline = time.monotonic() + 5  # the init process reaps the postmaster's zombie
        while True:
            alive = [pid for pid, created in self.tracked.items() if process_alive(pid, created)]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(STOP_TIMEOUT)

    def close(self) -> None:
        """Teardown: make sure nothing of this run is left, by pid."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for pid, created in self.tracked.items():
            if process_alive(pid, created):
                os.kill(pid, signal.SIGKILL)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()


@pytest.fixture
def dev_runs(tmp_path: Path) -> Iterator[list[DevRun]]:
    runs: list[DevRun] = []
    yield runs
    for run in runs:
        run.close()


def read_stack(data_dir: Path) -> tuple[str, dict[str, str]]:
    stack = json.loads((data_dir / "stack.json").read_text())
    assert set(stack) >= {"api_url", "mail_dir", "env"}
    assert Path(stack["mail_dir"]).is_absolute() and Path(stack["mail_dir"]).is_dir()
    assert set(stack["env"]) >= set(JOINED)
    return stack["api_url"], stack["env"]


def wait_for_text(url: str, expected: str, timeout: float = 20.0) -> bool:
    """True once GET ``url`` answers 200 with ``expected`` in its body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx2.get(url, timeout=2, trust_env=False)
            if response.status_code == 200 and expected in response.text:
                return True
        except httpx2.HTTPError:
            pass
        time.sleep(0.25)
    return False


def metric_value(url: str, series: str) -> float:
    """The value of one exposed series (``name{labels}`` as Prometheus prints it), 0 when absent."""
    for line in httpx2.get(url, timeout=5, trust_env=False).text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def order_count(env: dict[str, str]) -> int:
    with psycopg.connect(env["DATABASE_URL"]) as connection:
        row = connection.execute(
            "SELECT count(*) FROM orders JOIN accounts ON accounts.id = orders.account_id "
            "WHERE accounts.slug = 'acme'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def first_orders(api_url: str, token: str) -> list[dict[str, str]]:
    with httpx2.Client(trust_env=False, timeout=30) as client:
        response = client.get(
            f"{api_url}/api/v1/accounts/acme/orders",
            params={"limit": 5},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 200, response.text
    rows: list[dict[str, str]] = response.json()["rows"]
    return rows


def test_dev_runs_the_stack_stops_cleanly_and_keeps_data(
    tmp_path: Path, dev_runs: list[DevRun]
) -> None:
    data_dir = tmp_path / "stack"

    # Given a first run of `orders-export dev`
    started = time.monotonic()
    first = DevRun(data_dir, tmp_path / "dev.log")
    dev_runs.append(first)
    api_url = first.wait_ready()
    print(f"dev ready after {time.monotonic() - started:.1f}s")
    first.track_processes()

    # Then stack.json tells other processes how to join it
    stack_url, env = read_stack(data_dir)
    assert stack_url == api_url
    assert env["PUBLIC_URL"] == api_url
    # And where each service serves its metrics (the worker's include the backlog gauges)
    metrics = json.loads((data_dir / "stack.json").read_text())["metrics"]
    assert set(metrics) == {"api", "relay", "worker", "notifier"}
    assert metrics["api"] == f"{api_url}/metrics" and len(set(metrics.values())) == 4
    assert not set(env) & {"METRICS_PORT", "PROMETHEUS_MULTIPROC_DIR"}  # per service only
    for name, url in metrics.items():
        expected = 'orders_export_jobs{state="queued"}' if name == "worker" else "orders_export_"
        assert wait_for_text(url, expected), f"{name}: no {expected} at {url}"
    # And its Kafka consumers held their partitions when it said ready: the first export does
    # not wait seconds for the groups' first join
    for name, group in (("worker", "orders-export-worker"), ("notifier", "orders-export-notifier")):
        series = f'orders_export_consumer_assigned_partitions{{group="{group}"}}'
        assert metric_value(metrics[name], series) >= 1, f"{name}: {series} at ready"

    # When the CLI creates a token with that environment
    created = subprocess.run(
        cli("tokens", "create", "--email", "admin@acme.test"),
        cwd=REPO_ROOT,
        env=clean_env() | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token and len(token.split()) == 1

    # Then the API answers with demo orders
    rows = first_orders(api_url, token)
    assert len(rows) == 5
    count = order_count(env)
    assert count == DEMO_ORDERS

    # When dev gets SIGTERM
    assert first.terminate() == 0

    # Then none of its processes (nor PostgreSQL) is left
    assert first.survivors() == []
    assert not (data_dir / "postgres" / "postmaster.pid").exists()

    # When it starts again on the same directory
    second = DevRun(data_dir, tmp_path / "dev.log")
    dev_runs.append(second)
    api_url = second.wait_ready()
    second.track_processes()
    _, env_again = read_stack(data_dir)

    # Then the data and the secret key were kept: same orders, the old token still works
    assert env_again["SECRET_KEY"] == env["SECRET_KEY"]
    assert order_count(env_again) == count
    assert first_orders(api_url, token) == rows

    assert second.terminate() == 0
    assert second.survivors() == []
