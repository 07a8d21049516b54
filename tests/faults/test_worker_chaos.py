"""Chaos: several worker processes, killed at random (SIGKILL and SIGTERM) while two dozen
throttled exports over three accounts run. Every export ends ``ready`` exactly once, each file
equals a fault-free run of its filters (header + the same COPY as the report), one email each.

The seed of the random choices is in the test's output (``CHAOS_SEED`` replays a run). It runs
after tests/faults/test_replay.py (file order): that one replays the in-memory broker's topics,
which an earlier broker restart (test_infrastructure.py) empties of older events."""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from typing import Any

import httpx2
import pytest

from shared.devstack.children import ChildProcess, python_env
from tests.faults.support import (
    assert_ready_once,
    service_settings,
    settle,
    uploads_of,
)
from tests.support.exports import export_of, request_export
from tests.support.stack import LiveStack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

#: Worker processes running at any time.
WORKERS = 3
#: Kills before the chaos stops and the exports may drain.
KILLS = 5
#: Filter sets (the sort is part of them, so each is an export of its own, all above the
#: inline threshold), each requested on every account.
FILTER_SETS: tuple[dict[str, Any], ...] = (
    {"sort": "number"},
    {"sort": "-number"},
    {"sort": "placed_at"},
    {"sort": "-placed_at"},
    {"sort": "total"},
    {"sort": "-total"},
    {"sort": "number", "placed_from": "2000-01-01"},
    {"sort": "-total", "placed_from": "2000-01-01"},
)
ACCOUNTS = ("acme", "beta", "gamma")
#: Attempts per export: a SIGKILL costs one (rescued after the lease), a SIGTERM none.
MAX_ATTEMPTS = KILLS + 2
#: Longest the whole run may take before the test gives up (seconds).
DEADLINE_SECONDS = 420


def busy_workers(stack: LiveStack, workers: list[ChildProcess]) -> list[ChildProcess]:
    """The workers running an export now (a worker id is ``host:pid:random``), waiting a while
    for one: a kill should hit exports mid-flight, not a worker still starting up."""
    deadline = time.monotonic() + 30
    while True:
        rows = stack.sql("SELECT worker_id FROM export_jobs WHERE state = 'running'")
        pids = {int(worker_id.split(":")[1]) for (worker_id,) in rows if worker_id}
        busy = [worker for worker in workers if worker.pid in pids]
        if busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.2)


def start_worker(stack: LiveStack, number: int) -> ChildProcess:
    env = {
        **os.environ,
        **stack.env,
        "WORKER_SHUTDOWN_GRACE_SECONDS": "2",  # SIGTERM hands long exports back quickly
        "METRICS_PORT": "0",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    child = ChildProcess(
        name=f"chaos-worker-{number}",
        argv=[sys.executable, "-m", "services.worker"],
        env=python_env(env),
    )
    child.start()
    return child


def test_workers_killed_at_random_every_export_ready_once_with_the_right_file(
    stack: LiveStack, api: httpx2.Client
) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or time.time_ns() % 1_000_000)
    print(f"CHAOS_SEED={seed}")
    rng = random.Random(seed)
    # Given several worker processes instead of the stack's one, and enough attempts per export
    stack.kill_service("worker", signal.SIGTERM)
    overrides = {"EXPORT_MAX_ATTEMPTS": str(MAX_ATTEMPTS), "EXPORT_MAX_ACTIVE_PER_USER": "100"}
    try:
        with service_settings(stack, "api", **overrides):
            wait_for(stack._api_up, timeout=30, what="the API")
            workers: list[ChildProcess] = []
            started = 0
            try:
                for _ in range(WORKERS):
                    workers.append(start_worker(stack, started))
                    started += 1
                # When two dozen exports over three accounts are requested
                export_ids = [
                    request_export(api, filters, slug=slug)["id"]
                    for filters in FILTER_SETS
                    for slug in ACCOUNTS
                ]
                assert len(set(export_ids)) == len(FILTER_SETS) * len(ACCOUNTS)
                # And workers are killed at random while they run: SIGKILL or SIGTERM, then replaced
                deadline = time.monotonic() + DEADLINE_SECONDS
                signals: list[str] = []
                for _ in range(KILLS):
                    time.sleep(rng.uniform(0.5, 3.0))
                    victim = rng.choice(busy_workers(stack, workers) or workers)
                    signum = rng.choice((signal.SIGKILL, signal.SIGTERM))
                    signals.append(signum.name)
                    assert victim.pid is not None
                    os.kill(victim.pid, signum)
                    victim.stop(timeout=30)  # a SIGTERMed one hands its exports back first
                    workers.remove(victim)
                    workers.append(start_worker(stack, started))
                    started += 1
                print("signals sent:", ", ".join(signals))

                def done() -> bool:
                    states = [export_of(api, export_id)["state"] for export_id in export_ids]
                    assert "failed" not in states, states
                    return all(state == "ready" for state in states)

                while not done():
                    assert time.monotonic() < deadline, "the exports did not all finish"
                    time.sleep(1)
                settle(stack, timeout=120)
                # Then every export is ready exactly once, with the right file and one email
                for export_id in export_ids:
                    attempts = export_of(api, export_id)["attempts"]
                    assert_ready_once(
                        stack,
                        api,
                        export_id,
                        attempts=attempts,
                        leftover_uploads=len(uploads_of(stack, export_id)),  # SIGKILLed mid-upload
                    )
            finally:
                for worker in workers:
                    worker.stop(timeout=30)
    finally:
        stack.start_service("worker")
        wait_for(stack._api_up, timeout=30, what="the API")
