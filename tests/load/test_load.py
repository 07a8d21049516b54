"""A bounded load test on the live stack (loopback only; it stops by itself).

50 clients (threads, one HTTP connection each) for 60 seconds over 20 accounts, each client an
admin of one account: report reads (JSON pages, cursors, the HTML page), export requests (small
ones made inside the request, big ones queued for the workers), export status, lists and
downloads. Then the pipeline drains, and the final state is checked: no 5xx and no transport
error, every accepted export finished (ready), nothing left in the queue, the outbox or the
Kafka groups, one email per background export, and the worker's counters agree with the
database. The figures go to ``load-results.json`` in the test's temporary directory (and to
``$LOAD_RESULTS_FILE`` when set) and are printed.

``LOAD_SECONDS`` / ``LOAD_CLIENTS`` shorten or lengthen a run (capped at 300 s and 100 clients).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest

from shared.db import make_engine, make_sessionmaker, transaction
from shared.identity import create_token, ensure_account, set_membership, upsert_user
from shared.models import Role
from shared.seeding import seed_orders
from tests.faults.support import dramatiq_backlog, metric, metrics, unsettled
from tests.support.stack import LiveStack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

SECONDS = min(float(os.environ.get("LOAD_SECONDS", "60")), 300.0)
CLIENTS = min(int(os.environ.get("LOAD_CLIENTS", "50")), 100)
ACCOUNTS = 20
#: Orders per account: the first ones are above the 10,000-row async threshold.
BIG_ORDERS, SMALL_ORDERS, BIG_ACCOUNTS = 12_000, 3_000, 8
#: Longest the pipeline may take to finish the accepted exports after the clients stop (s).
DRAIN_SECONDS = 180
#: Per-request timeout of the clients (s): a request slower than this counts as an error.
REQUEST_TIMEOUT = 30.0
STATUSES = ("paid", "fulfilled", "pending", "refunded", "canceled")
CHANNELS = ("web", "pos", "marketplace", "phone")
SORTS = ("-placed_at", "placed_at", "-total", "total", "number", "-number")
#: Mix of actions (weights).
MIX = {
    "report": 55,
    "report_next": 10,
    "page": 8,
    "export": 12,
    "status": 8,
    "list": 4,
    "download": 3,
}


@dataclass
class Account:
    slug: str
    token: str
    big: bool


@dataclass
class Tally:
    """What one client saw; merged at the end."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    exports: dict[str, str] = field(default_factory=dict)  # export id -> how it was answered
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def merge(self, other: Tally) -> None:
        for kind, values in other.latencies.items():
            self.latencies.setdefault(kind, []).extend(values)
        self.statuses.update(other.statuses)
        self.exports.update(other.exports)
        self.outcomes.update(other.outcomes)
        self.errors.extend(other.errors)


def seed_accounts(stack: LiveStack) -> list[Account]:
    engine = make_engine(stack.database_url, pool_size=1)
    accounts = []
    try:
        with transaction(make_sessionmaker(engine)) as session:
            for number in range(1, ACCOUNTS + 1):
                slug = f"load-{number:02d}"
                big = number <= BIG_ACCOUNTS
                account = ensure_account(session, slug=slug, timezone="Europe/Berlin")
                user = upsert_user(
                    session, email=f"admin@{slug}.test", password="load-test-password"
                )
                set_membership(session, account=account, user=user, role=Role.ADMIN)
                seed_orders(
                    session, account, orders=BIG_ORDERS if big else SMALL_ORDERS, seed=number
                )
                accounts.append(Account(slug, create_token(session, user), big))
    finally:
        engine.dispose()
    return accounts


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveStack, list[Account]]]:
    # Leases longer than a CPU-starved heartbeat could miss (2 cores, 50 clients, all services).
    env = {"EXPORT_LEASE_SECONDS": "30", "EXPORT_MAX_ATTEMPTS": "3"}
    live = LiveStack(Path(tmp_path_factory.mktemp("load")), orders=1_000, env=env)
    try:
        live.start()
        yield live, seed_accounts(live)
    finally:
        live.stop()


def random_filters(rng: random.Random) -> dict[str, Any]:
    """Valid report filters; about one in six selects everything (on a big account, a full
    export is a background job; most others are made inside the request)."""
    filters: dict[str, Any] = {"sort": rng.choice(SORTS)}
    roll = rng.random()
    if roll < 0.3:
        filters["status"] = rng.sample(STATUSES, rng.randint(1, 3))
    elif roll < 0.5:
        filters["channel"] = rng.sample(CHANNELS, rng.randint(1, 2))
    elif roll < 0.7:
        start = rng.randint(0, 600)
        first = time.strftime("%Y-%m-%d", time.gmtime(1735689600 + start * 86400))
        last = time.strftime(
            "%Y-%m-%d", time.gmtime(1735689600 + (start + rng.randint(1, 120)) * 86400)
        )
        filters.update(placed_from=first, placed_to=last)
    elif roll < 0.8:
        filters["min_total"] = str(rng.randint(0, 1500))
    elif roll < 0.85:
        filters["q"] = rng.choice(("example", "Ada", "o'brien", "🚀", "customer1"))
    return filters


def query(filters: dict[str, Any]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for key, value in filters.items():
        for item in value if isinstance(value, list) else [value]:
            pairs.append((key, str(item)))
    return pairs


def client_loop(
    stack: LiveStack, account: Account, seed: int, deadline: float, tally: Tally
) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*MIX.items(), strict=True)
    cursor: str | None = None
    params: list[tuple[str, str]] = []
    known: list[str] = []
    headers = {"Authorization": f"Bearer {account.token}"}
    with httpx2.Client(
        base_url=stack.api_url, headers=headers, timeout=REQUEST_TIMEOUT, trust_env=False
    ) as http:

        def call(kind: str, method: str, url: str, **kwargs: Any) -> httpx2.Response | None:
            started = time.perf_counter()
            try:
                response = http.request(method, url, **kwargs)
            except httpx2.HTTPError as exc:
                tally.errors.append(f"{kind}: {type(exc).__name__}")
                tally.statuses["transport-error"] += 1
                return None
            tally.latencies.setdefault(kind, []).append((time.perf_counter() - started) * 1000)
            tally.statuses[str(response.status_code)] += 1
            if response.status_code >= 500:
                tally.errors.append(f"{kind}: HTTP {response.status_code} {response.text[:200]}")
            return response

        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            slug = account.slug
            if kind == "report_next" and cursor is None:
                kind = "report"
            if kind in ("report", "report_next"):
                if kind == "report":  # a new query; the next page repeats it with the cursor
                    params = query(random_filters(rng))
                    params.append(("limit", str(rng.choice((25, 100, 500)))))
                    page = params
                else:
                    page = [*params, ("cursor", cursor or "")]
                response = call(kind, "GET", f"/api/v1/accounts/{slug}/orders", params=page)
                if response is not None and response.status_code == 200:
                    cursor = response.json()["next_cursor"]
                elif response is not None:
                    tally.errors.append(
                        f"{kind}: HTTP {response.status_code} {response.text[:300]}"
                    )
                    cursor = None
            elif kind == "page":
                html_query = query(random_filters(rng))
                response = call(kind, "GET", f"/accounts/{slug}/orders", params=html_query)
                if response is not None and response.status_code != 200:
                    tally.errors.append(f"page: HTTP {response.status_code}")
            elif kind == "export":
                # A third ask for everything: on a big account, a background job
                filters = (
                    {"sort": rng.choice(SORTS)} if rng.random() < 0.33 else random_filters(rng)
                )
                body = {"filters": filters}
                response = call(kind, "POST", f"/api/v1/accounts/{slug}/order-exports", json=body)
                if response is None:
                    continue
                code = response.status_code
                outcome = {201: "inline", 202: "queued", 200: "existing", 429: "throttled"}.get(
                    code
                )
                if outcome is None:
                    tally.errors.append(f"export: HTTP {code} {response.text[:200]}")
                    continue
                tally.outcomes[outcome] += 1
                if code in (200, 201, 202):
                    export = response.json()["export"]
                    tally.exports.setdefault(export["id"], outcome)
                    known.append(export["id"])
                    if code == 201:
                        assert export["state"] == "ready"
            elif kind == "status" and known:
                response = call(kind, "GET", f"/api/v1/order-exports/{rng.choice(known)}")
                if response is not None and response.status_code != 200:
                    tally.errors.append(f"status: HTTP {response.status_code}")
            elif kind == "download" and known:
                response = call("status", "GET", f"/api/v1/order-exports/{rng.choice(known)}")
                if response is None or response.status_code != 200:
                    continue
                url = response.json()["export"]["download_url"]
                if url:
                    file = call(kind, "GET", url)
                    if file is not None and file.status_code != 200:
                        tally.errors.append(f"download: HTTP {file.status_code}")
            else:
                response = call("list", "GET", f"/api/v1/accounts/{slug}/order-exports")
                if response is not None and response.status_code != 200:
                    tally.errors.append(f"list: HTTP {response.status_code}")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    cuts = (
        statistics.quantiles(ordered, n=100, method="inclusive")
        if len(ordered) > 1
        else ordered * 99
    )
    return {
        "count": len(ordered),
        "p50_ms": round(cuts[49], 1),
        "p95_ms": round(cuts[94], 1),
        "p99_ms": round(cuts[98], 1),
        "max_ms": round(ordered[-1], 1),
    }


def drained(stack: LiveStack) -> list[str]:
    reasons = unsettled(stack)
    backlog = dramatiq_backlog(stack)
    if backlog.held or backlog.orphaned:
        reasons.append(f"Dramatiq: {backlog}")
    return reasons


def test_fifty_clients_for_a_minute_no_errors_and_every_export_finishes(
    loaded: tuple[LiveStack, list[Account]], tmp_path: Path
) -> None:
    stack, accounts = loaded
    tally = Tally()
    tallies = [Tally() for _ in range(CLIENTS)]
    started = time.monotonic()
    deadline = started + SECONDS
    threads = [
        threading.Thread(
            target=client_loop,
            args=(stack, accounts[n % ACCOUNTS], n, deadline, tallies[n]),
            name=f"load-client-{n}",
        )
        for n in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=SECONDS + REQUEST_TIMEOUT + 30)
        assert not thread.is_alive(), "a load client did not stop"
    elapsed = time.monotonic() - started
    for part in tallies:
        tally.merge(part)

    # The pipeline finishes what was accepted
    drain_started = time.monotonic()
    deadline_drain = drain_started + DRAIN_SECONDS
    while reasons := drained(stack):
        assert time.monotonic() < deadline_drain, f"not drained after {DRAIN_SECONDS}s: {reasons}"
        time.sleep(1)
    drain_seconds = time.monotonic() - drain_started
    background = stack.sql(
        "SELECT state::text, count(*), coalesce(sum(row_count), 0), coalesce(sum(attempts), 0)"
        " FROM export_jobs j JOIN accounts a ON a.id = j.account_id"
        " WHERE a.slug LIKE 'load-%%' AND j.enqueued_at IS NOT NULL GROUP BY 1"
    )
    by_state = {state: (count, rows, attempts) for state, count, rows, attempts in background}
    inline = stack.sql(
        "SELECT state::text, count(*) FROM export_jobs j JOIN accounts a ON a.id = j.account_id"
        " WHERE a.slug LIKE 'load-%%' AND j.enqueued_at IS NULL GROUP BY 1"
    )
    ready_jobs, ready_rows, ready_attempts = by_state.get("ready", (0, 0, 0))
    emails = stack.sql("SELECT count(*) FROM notifications WHERE sent_at IS NOT NULL")[0][0]

    everything = [v for values in tally.latencies.values() for v in values]
    figures = {
        "clients": CLIENTS,
        "accounts": ACCOUNTS,
        "seconds": round(elapsed, 1),
        "requests": len(everything) + tally.statuses["transport-error"],
        "requests_per_second": round(len(everything) / elapsed, 1),
        "latency": percentiles(everything),
        "latency_by_kind": {k: percentiles(v) for k, v in sorted(tally.latencies.items())},
        "status_codes": dict(sorted(tally.statuses.items())),
        "errors": {
            "5xx": sum(n for code, n in tally.statuses.items() if code.startswith("5")),
            "transport": tally.statuses["transport-error"],
            "other": len(tally.errors),
            "examples": tally.errors[:10],
        },
        "exports": {
            "requests": sum(tally.outcomes.values()),
            "answers": dict(tally.outcomes),
            "background_accepted": sum(c for c, _, _ in by_state.values()),
            "background_ready": ready_jobs,
            "background_by_state": {s: c for s, (c, _, _) in by_state.items()},
            "inline_by_state": dict(inline),
            "ready_emails": emails,
        },
        "drain_seconds": round(drain_seconds, 1),
    }
    text = json.dumps(figures, indent=2)
    (tmp_path / "load-results.json").write_text(text)
    if os.environ.get("LOAD_RESULTS_FILE"):
        Path(os.environ["LOAD_RESULTS_FILE"]).write_text(text)
    print(f"\nload test figures ({tmp_path / 'load-results.json'}):\n{text}")

    # No server error, no failed connection or timeout, nothing unexpected
    assert figures["errors"]["5xx"] == 0 and figures["errors"]["transport"] == 0, tally.errors[:10]
    assert tally.errors == []
    # Enough happened to mean something
    assert figures["requests"] >= 20 * SECONDS
    assert tally.outcomes["queued"] >= 10 and tally.outcomes["inline"] >= 10, tally.outcomes
    # Every accepted export is finished, and ready
    assert set(by_state) == {"ready"}, by_state
    assert set(dict(inline)) <= {"ready"}, inline
    assert ready_jobs >= tally.outcomes["queued"]
    # One ready email per background export, none for exports made inside the request
    assert emails == ready_jobs
    # The worker's counters and gauges agree with the database
    samples = metrics(stack, "worker")
    assert (
        metric(samples, "orders_export_job_duration_seconds_count", outcome="ready") == ready_jobs
    )
    assert metric(samples, "orders_export_rows_total") == ready_rows
    assert ready_attempts == ready_jobs  # no retries were needed

    def gauges_idle() -> bool:
        s = metrics(stack, "worker")
        return (
            metric(s, "orders_export_jobs", state="queued") == 0
            and metric(s, "orders_export_jobs", state="running") == 0
            and metric(s, "orders_export_queue_depth") == 0
            and metric(s, "orders_export_outbox_pending") == 0
            and metric(s, "orders_export_consumer_lag") == 0
        )

    wait_for(gauges_idle, timeout=30, what="the backlog gauges to read zero", interval=1)
