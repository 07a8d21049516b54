"""The 500k-row export benchmark: the product end to end against the physical floor and the
way most apps do it, the report under load, small exports under a backlog and scale-out,
measured side by side in ONE run on the embedded local stack.

    python benchmarks/export.py [--rows 500000] [--runs 3] [--load-seconds 10]
                                [--only export,report,lanes,scale] [--skip-naive]

1. starts ``orders-export dev`` (embedded PostgreSQL, Redis, Kafka-protocol broker, ...) with
   ``--rows`` demo orders in the account ``acme``;
2. ``export``: the floor (the report's own ``COPY (SELECT <report columns> ...) TO STDOUT``
   into /dev/null through psycopg, and a raw ``COPY (SELECT *)``), the naive peers (a
   server-side cursor + csv.writer, SQLAlchemy ORM ``yield_per`` + csv.writer), the product
   over HTTP (POST -> ready from the job's own ``finished_at``, the worker's own time, rows/s,
   MB/s, queue wait, POST latency p50/p99, peak RSS of the worker process, progress gaps),
   downloads (``benchmarks/downloads.py``: the file through the API, streamed from
   local and from S3 storage and redirected to S3, each against reading the same bytes from
   storage directly and against a zero-copy HTTP server; curl is the client of every path),
   and the gzip option;
3. ``report``: the report API's p50/p99 (overall and per query) under 8 clients cycling every
   filter, sort and ``q`` search, without and with exports running back to back, and
   ``EXPLAIN (ANALYZE, BUFFERS)`` of every query taken under that load;
4. ``lanes``: two big exports of two other accounts running (one more of each queued), and
   20k-row exports of a third account one after another: queue wait and POST -> ready p50/p99;
5. ``scale``: a second stack, 40 exports of ``--scale-rows`` rows over 20 accounts against 1, 2
   and 4 worker processes: total time, exports/s, rows/s, PostgreSQL CPU.

Prints a table and writes ``benchmarks/results/export-<rows>.json`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import functools
import itertools
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import downloads
import httpx2
import psutil
import psycopg
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from shared.csvfile import copy_rows, copy_statement
from shared.db import sqlalchemy_url
from shared.devstack.stack import JOINED
from shared.filters import OrderFilters, parse_filters
from shared.models import Account, ExportJob, Order
from shared.report import DEFAULT_PAGE_SIZE, explain, page_select, search_terms
from shared.storage import CHUNK_BYTES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
READY = re.compile(r"ready (http://127\.0\.0\.1:\d+)")
#: The report endpoint the load cycles over.
REPORT_PATH = "/api/v1/accounts/acme/orders"
#: Report queries the load generator cycles through (one page each): every filter, every sort
#: and ``q`` searches on the order number, the customer's name and the email, alone and combined.
REPORT_QUERIES: tuple[dict[str, Any], ...] = (
    {},
    {"q": "lovelace"},
    {"status": "paid"},
    {"q": "A-01234"},
    {"channel": ["web", "pos"], "sort": "-total"},
    {"q": "customer4242@"},
    {"placed_from": "2025-06-01", "placed_to": "2025-06-30"},
    {"q": "hopper", "sort": "-total"},
    {"min_total": "100", "max_total": "300", "sort": "number"},
    {"q": "customer777", "status": "refunded"},
    {"sort": "placed_at"},
    {"q": "a-0499", "sort": "number"},
    {"sort": "-number", "channel": "phone"},
    {"q": "example.test", "sort": "total"},
)
#: Pause between two status requests while waiting for an export (seconds).
POLL_SECONDS = 0.1
TEXT_KEYS = ("number", "customer_name", "customer_email", "status", "channel", "currency")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def median_time(fn: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings), timings


@contextmanager
def dev_stack(
    rows: int, data_dir: Path, extra_env: dict[str, str]
) -> Iterator[tuple[dict[str, Any], subprocess.Popen[str]]]:
    env = {k: v for k, v in os.environ.items() if k not in JOINED}
    env.update(extra_env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "dev",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
            "--demo-orders",
            str(rows),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if READY.search(line):
                break
        else:
            raise RuntimeError("orders-export dev exited before it was ready")
        yield json.loads((data_dir / "stack.json").read_text()), process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def account_of(database_url: str) -> Account:
    engine = create_engine(sqlalchemy_url(database_url))
    with Session(engine) as session:
        account = session.scalars(select(Account).where(Account.slug == "acme")).one()
        session.expunge(account)
    engine.dispose()
    return account


def floor_copy(database_url: str, account: Account, *, reader: str = "libpq") -> int:
    """The report's own formatted COPY into /dev/null, no job machinery: the floor. Its rows
    are read as the product reads them (``copy_rows``, one libpq call a row) and written in
    1 MiB pieces; ``reader="psycopg"`` reads them through psycopg's ``Copy`` iteration, the
    floor's reader before 2026-12-06 (which also wrote each row on its own)."""
    statement, params = copy_statement(account, OrderFilters())
    rows = 0
    buffered = bytearray()
    with (
        psycopg.connect(database_url) as conn,
        open(os.devnull, "wb") as sink,
        psycopg.ClientCursor(conn).copy(statement, params) as copy,
    ):
        # Written in 1 MiB pieces, as the product writes its file: a write per row (500,000
        # system calls) made the floor slower than the product on 2026-12-06.
        for chunk in copy_rows(conn) if reader == "libpq" else copy:
            buffered += chunk
            rows += 1
            if len(buffered) >= CHUNK_BYTES:
                sink.write(buffered)
                buffered.clear()
        sink.write(buffered)
    return rows


def raw_copy(database_url: str, account: Account) -> None:
    statement = "COPY (SELECT * FROM orders WHERE account_id = %s) TO STDOUT (FORMAT csv)"
    with (
        psycopg.connect(database_url) as conn,
        open(os.devnull, "wb") as sink,
        conn.cursor().copy(statement, (account.id,)) as copy,
    ):
        for chunk in copy:
            sink.write(chunk)


def _guard(value: str) -> str:
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _display(
    tz: ZoneInfo,
    number: str,
    placed_at: dt.datetime,
    name: str,
    email: str,
    status: str,
    channel: str,
    items: int,
    subtotal: Decimal,
    tax: Decimal,
    shipping: Decimal,
    total: Decimal,
    currency: str,
) -> list[str]:
    return [
        _guard(number),
        placed_at.astimezone(tz).strftime("%Y-%m-%d %H:%M"),
        _guard(name),
        _guard(email),
        _guard(status),
        _guard(channel),
        str(items),
        f"{subtotal:.2f}",
        f"{tax:.2f}",
        f"{shipping:.2f}",
        f"{total:.2f}",
        _guard(currency),
    ]


def naive_cursor(database_url: str, account: Account) -> None:
    """What most apps do: a server-side cursor and csv.writer, values formatted in Python."""
    tz = ZoneInfo(account.timezone)
    with psycopg.connect(database_url) as conn, open(os.devnull, "w", newline="") as sink:
        writer = csv.writer(sink)
        with conn.cursor(name="export") as cursor:
            cursor.itersize = 5000
            cursor.execute(
                "SELECT number, placed_at, customer_name, customer_email, status, channel,"
                " items_count, subtotal, tax, shipping, total, currency FROM orders"
                " WHERE account_id = %s"
                " ORDER BY placed_at DESC, id DESC",
                (account.id,),
            )
            for row in cursor:
                writer.writerow(_display(tz, *row))


def naive_orm(database_url: str, account: Account) -> None:
    """The ORM version: SQLAlchemy objects streamed with yield_per, then csv.writer."""
    tz = ZoneInfo(account.timezone)
    engine = create_engine(sqlalchemy_url(database_url))
    with Session(engine) as session, open(os.devnull, "w", newline="") as sink:
        writer = csv.writer(sink)
        query = (
            select(Order)
            .where(Order.account_id == account.id)
            .order_by(Order.placed_at.desc(), Order.id.desc())
            .execution_options(yield_per=5000)
        )
        for order in session.scalars(query):
            writer.writerow(
                _display(
                    tz,
                    order.number,
                    order.placed_at,
                    order.customer_name,
                    order.customer_email,
                    order.status,
                    order.channel,
                    order.items_count,
                    order.subtotal,
                    order.tax,
                    order.shipping,
                    order.total,
                    order.currency,
                )
            )
    engine.dispose()


def worker_process(dev: subprocess.Popen[str]) -> psutil.Process:
    for child in psutil.Process(dev.pid).children(recursive=True):
        if "services.worker" in " ".join(child.cmdline()):
            return child
    raise RuntimeError("no worker process found")


def peak_rss_mib(process: psutil.Process) -> float:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return process.memory_info().rss / 2**20


def run_export(
    client: httpx2.Client,
    filters: dict[str, Any],
    *,
    watch_progress: bool = False,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    posted_at = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    response = client.post(
        "/api/v1/accounts/acme/order-exports",
        json={"filters": filters, "options": options or {}},
    )
    post_seconds = time.perf_counter() - started
    response.raise_for_status()
    export = response.json()["export"]
    changes: list[float] = []
    last_rows = -1
    while export["state"] in ("queued", "running"):
        # Polled gently: a status request every 10 ms costs the API and PostgreSQL about half
        # a core on this machine, which the export under test would lose. POST -> ready is
        # taken from the server's own finished_at instead of the poll that sees it.
        time.sleep(POLL_SECONDS)
        export = client.get(f"/api/v1/order-exports/{export['id']}").json()["export"]
        if (
            watch_progress
            and export["state"] == "running"
            and export["progress"]["rows_written"] != last_rows
        ):
            last_rows = export["progress"]["rows_written"]
            changes.append(time.perf_counter())
    observed = time.perf_counter() - started
    if export["state"] != "ready":
        raise RuntimeError(f"export ended {export['state']}: {export['error']}")
    created = dt.datetime.fromisoformat(export["created_at"])
    begun = dt.datetime.fromisoformat(export["started_at"])
    finished = dt.datetime.fromisoformat(export["finished_at"])
    gaps = [b - a for a, b in itertools.pairwise(changes)]
    return {
        "id": export["id"],
        "download_url": export["download_url"],
        # POST sent (this machine's clock) -> the worker's ready transition (the server's
        # clock: the same machine).
        "wall_seconds": (finished - posted_at).total_seconds(),
        "observed_seconds": observed,
        "post_seconds": post_seconds,
        "worker_seconds": (finished - begun).total_seconds(),
        "queue_wait_seconds": (begun - created).total_seconds(),
        "rows": export["row_count"],
        "bytes": export["file"]["size_bytes"],
        "max_progress_gap_seconds": max(gaps) if gaps else None,
        "progress_updates": len(changes),
    }


def storage_key(database_url: str, export_id: str) -> str:
    engine = create_engine(sqlalchemy_url(database_url))
    with Session(engine) as session:
        key = session.get_one(ExportJob, uuid.UUID(export_id)).storage_key
    engine.dispose()
    assert key is not None
    return key


def canceled_runs(metrics_url: str) -> float:
    """The worker's finished runs that ended canceled (its job duration histogram's count)."""
    text = httpx2.get(metrics_url, timeout=10, trust_env=False).text
    prefix = 'orders_export_job_duration_seconds_count{outcome="canceled"} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def post_latencies(
    client: httpx2.Client, count: int, *, worker_metrics: str
) -> tuple[list[float], int]:
    """POST latency of background exports, each canceled at once to stay under the cap, and
    how many of them a worker claimed before the cancel landed.

    A worker claims a queued export within ~50 ms, often before the client's cancel: its COPY
    then runs until the next heartbeat notices the cancel (up to a second), beside the next
    POSTs. So after such a cancel the next POST waits until that run has ended: every POST is
    timed with no export running (the figure the target is about)."""
    latencies, claimed = [], 0
    for n in range(count):
        started = time.perf_counter()
        response = client.post(
            "/api/v1/accounts/acme/order-exports", json={"filters": {"min_total": str(n + 1)}}
        )
        latencies.append(time.perf_counter() - started)
        response.raise_for_status()
        export_id = response.json()["export"]["id"]
        before = canceled_runs(worker_metrics)
        client.post(f"/api/v1/order-exports/{export_id}/cancel").raise_for_status()
        if get_export(client, export_id)["started_at"] is None:
            continue
        claimed += 1
        deadline = time.monotonic() + 30
        while canceled_runs(worker_metrics) <= before and time.monotonic() < deadline:
            time.sleep(0.05)
    return latencies, claimed


def _plan_lines(node: dict[str, Any], depth: int = 0) -> list[str]:
    """One line per plan node: type, index, actual rows and time, shared buffers."""
    index = f" using {node['Index Name']}" if "Index Name" in node else ""
    line = (
        f"{'  ' * depth}{node['Node Type']}{index}"
        f" (rows={node.get('Actual Rows')} loops={node.get('Actual Loops')}"
        f" time={node.get('Actual Total Time')} ms"
        f" hit={node.get('Shared Hit Blocks')} read={node.get('Shared Read Blocks')})"
    )
    lines = [line]
    for child in node.get("Plans", []):
        lines.extend(_plan_lines(child, depth + 1))
    return lines


def explain_report_queries(database_url: str) -> list[dict[str, Any]]:
    """EXPLAIN (ANALYZE, BUFFERS) of the first page of every report query of the load."""
    engine = create_engine(sqlalchemy_url(database_url))
    found = []
    with Session(engine) as session:
        account = session.scalars(select(Account).where(Account.slug == "acme")).one()
        for params in REPORT_QUERIES:
            raw = {k: v if isinstance(v, list) else [v] for k, v in params.items()}
            filters = parse_filters(raw)
            started = time.perf_counter()
            terms = search_terms(session, account, filters.q)
            terms_ms = (time.perf_counter() - started) * 1000
            query = page_select(account, filters, limit=DEFAULT_PAGE_SIZE, terms=terms)
            plan = explain(session, query, analyze=True)[0]
            found.append(
                {
                    "query": params,
                    "search_terms": None if terms is None else len(terms.names + terms.emails),
                    "search_terms_ms": round(terms_ms, 3) if filters.q else None,
                    "execution_ms": plan["Execution Time"],
                    "planning_ms": plan["Planning Time"],
                    "plan": _plan_lines(plan["Plan"]),
                }
            )
    engine.dispose()
    return found


def report_load(
    api_url: str,
    token: str,
    *,
    clients: int,
    seconds: float,
    background: Callable[[threading.Event], None] | None,
    explain_into: list[dict[str, Any]] | None = None,
    database_url: str | None = None,
    by_query: dict[int, list[float]] | None = None,
) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()
    #: Cleared at the end of the timed window: the clients keep the load on while the plans are
    #: taken, but what the EXPLAIN ANALYZE runs add to the load is not in the figures.
    recording = threading.Event()
    recording.set()

    def client_loop(n: int) -> None:
        with httpx2.Client(
            base_url=api_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            trust_env=False,
        ) as c:
            for i in itertools.count(n):
                if stop.is_set():
                    return
                query = i % len(REPORT_QUERIES)
                timed = recording.is_set()  # a request sent in the window counts
                started = time.perf_counter()
                c.get(REPORT_PATH, params=REPORT_QUERIES[query]).raise_for_status()
                elapsed = time.perf_counter() - started
                if not timed:
                    continue
                with lock:
                    latencies.append(elapsed)
                    if by_query is not None:
                        by_query.setdefault(query, []).append(elapsed)

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(clients)]
    if background is not None:
        threads.append(threading.Thread(target=background, args=(stop,)))
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    recording.clear()
    if explain_into is not None and database_url is not None:
        # The plans of every report query, under the same load (clients and background).
        explain_into.extend(explain_report_queries(database_url))
    stop.set()
    for thread in threads:
        thread.join()
    return latencies


#: The parts of the benchmark (``--only`` picks some; all run by default).
SECTIONS = ("export", "report", "lanes", "scale")


def cli_env(env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **env, "PYTHONPATH": str(ROOT)}


def cli(env: dict[str, str], *args: str) -> str:
    """Run ``orders-export ARGS`` against the stack; its standard output."""
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        env=cli_env(env),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def export_section(
    args: argparse.Namespace,
    results: dict[str, Any],
    stack: dict[str, Any],
    dev: subprocess.Popen[str],
    token: str,
) -> None:
    """Floor, naive peers, the product's POST -> ready, gzip, downloads, POST latency, RSS."""
    env = stack["env"]
    database_url = env["DATABASE_URL"]
    account = account_of(database_url)
    assert floor_copy(database_url, account) == args.rows
    results["raw_copy_seconds"], _ = median_time(lambda: raw_copy(database_url, account), args.runs)
    if not args.skip_naive:
        results["naive_cursor_seconds"], _ = median_time(
            lambda: naive_cursor(database_url, account), args.runs
        )
        results["naive_orm_seconds"], _ = median_time(
            lambda: naive_orm(database_url, account), args.runs
        )

    headers = {"Authorization": f"Bearer {token}"}
    with httpx2.Client(
        base_url=stack["api_url"], headers=headers, timeout=120, trust_env=False
    ) as client:
        # The floor and the product alternate, so that both see the same machine (it is shared
        # and its speed drifts within minutes): floor, export, floor, export, ...
        floors, psycopg_floors, runs = [], [], []
        for n in range(args.runs):
            floors.append(median_time(lambda: floor_copy(database_url, account), 1)[0])
            runs.append(run_export(client, {}, watch_progress=(n == 0)))
            psycopg_floors.append(
                median_time(lambda: floor_copy(database_url, account, reader="psycopg"), 1)[0]
            )
        results["floor_seconds"], results["floor_runs"] = statistics.median(floors), floors
        results["floor_psycopg_seconds"] = statistics.median(psycopg_floors)
        results["floor_psycopg_runs"] = psycopg_floors
        results["export_runs"] = runs
        results["gzip_runs"] = [
            run_export(client, {}, options={"compression": "gzip"}) for _ in range(args.runs)
        ]
        results |= downloads.measure(
            env=env,
            token=token,
            download_url=runs[0]["download_url"],
            key=storage_key(database_url, runs[0]["id"]),
            size=runs[0]["bytes"],
            runs=args.runs,
        )
        latencies, claimed = post_latencies(client, 50, worker_metrics=stack["metrics"]["worker"])
        results["post_latencies_seconds"] = latencies
        results["posts_claimed_before_cancel"] = claimed
    results["worker_peak_rss_mib"] = peak_rss_mib(worker_process(dev))


def report_section(
    args: argparse.Namespace, results: dict[str, Any], stack: dict[str, Any], token: str
) -> None:
    """The report API under 8 clients, idle and with exports running back to back."""
    database_url = stack["env"]["DATABASE_URL"]
    headers = {"Authorization": f"Bearer {token}"}
    results["report_queries"] = list(REPORT_QUERIES)
    load = functools.partial(
        report_load,
        stack["api_url"],
        token,
        clients=args.load_clients,
        seconds=args.load_seconds,
    )
    # This machine pages out memory nobody touched for 60 s (a DAMON "pageout" scheme on the
    # VM, page cache included), so after the export part the report's index pages are on disk
    # again. One request of each query first, timed and kept apart (report_cold_ms), then the
    # load measures the report as it runs in steady state.
    with httpx2.Client(
        base_url=stack["api_url"], headers=headers, timeout=30, trust_env=False
    ) as client:
        cold = []
        for query in REPORT_QUERIES:
            started = time.perf_counter()
            client.get(REPORT_PATH, params=query).raise_for_status()
            cold.append(1000 * (time.perf_counter() - started))
        results["report_cold_ms"] = cold
    idle_by_query: dict[int, list[float]] = {}
    results["report_latencies_idle"] = load(background=None, by_query=idle_by_query)
    results["report_by_query_idle"] = [
        {
            "query": REPORT_QUERIES[n],
            "requests": len(values),
            "p50_ms": 1000 * percentile(values, 50),
            "p99_ms": 1000 * percentile(values, 99),
        }
        for n, values in sorted(idle_by_query.items())
    ]

    def exports_running(stop: threading.Event) -> None:
        with httpx2.Client(
            base_url=stack["api_url"], headers=headers, timeout=120, trust_env=False
        ) as c:
            while not stop.is_set():
                results.setdefault("report_background_exports", []).append(run_export(c, {}))

    results["report_plans_exporting"] = []
    results["report_latencies_exporting"] = load(
        background=exports_running,
        explain_into=results["report_plans_exporting"],
        database_url=database_url,
    )


#: Accounts of the small-export-under-backlog part: a second big one and the small one.
BIG_ACCOUNT = "bench-big"
SMALL_ACCOUNT = "bench-small"
#: Rows of the small export (a fast-lane export with the default EXPORT_FAST_LANE_MAX_ROWS).
SMALL_ROWS = 20_000


def post_export(client: httpx2.Client, slug: str, filters: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/api/v1/accounts/{slug}/order-exports", json={"filters": filters})
    response.raise_for_status()
    return dict(response.json()["export"])


def get_export(client: httpx2.Client, export_id: str) -> dict[str, Any]:
    return dict(client.get(f"/api/v1/order-exports/{export_id}").json()["export"])


def keep_busy(client: httpx2.Client, slug: str, stop: threading.Event, seen: list[str]) -> None:
    """Keep two exports of ``slug`` active (one running, one queued behind it) until ``stop``."""
    active: list[str] = []
    n = 0
    while not stop.is_set():
        active = [i for i in active if get_export(client, i)["state"] in ("queued", "running")]
        while len(active) < 2:
            n += 1
            export = post_export(client, slug, {"max_total": str(1_000_000 + n)})
            active.append(export["id"])
            seen.append(export["id"])
        stop.wait(POLL_SECONDS)
    for export_id in active:
        client.post(f"/api/v1/order-exports/{export_id}/cancel")


def lanes_section(
    args: argparse.Namespace, results: dict[str, Any], stack: dict[str, Any], token: str
) -> None:
    """Small exports under a backlog of big ones: two big exports of two other accounts running,
    one more of each queued behind them, and a 20k-row export of a third account, one at a
    time: its queue wait (created -> claimed) and POST -> ready."""
    env = stack["env"]
    started = time.perf_counter()
    for slug, orders in ((BIG_ACCOUNT, args.rows), (SMALL_ACCOUNT, SMALL_ROWS)):
        cli(env, "seed", "--account", slug, "--orders", str(orders))
        cli(env, "users", "create", "--email", "admin@acme.test", "--password",
            "admin-password", "--account", slug, "--role", "admin")  # fmt: skip
    results["lanes_seed_seconds"] = time.perf_counter() - started
    headers = {"Authorization": f"Bearer {token}"}
    stop = threading.Event()
    big: list[str] = []

    def busy(slug: str) -> None:
        with httpx2.Client(
            base_url=stack["api_url"], headers=headers, timeout=120, trust_env=False
        ) as c:
            keep_busy(c, slug, stop, big)

    threads = [threading.Thread(target=busy, args=(slug,)) for slug in ("acme", BIG_ACCOUNT)]
    samples = []
    with httpx2.Client(
        base_url=stack["api_url"], headers=headers, timeout=120, trust_env=False
    ) as client:
        for thread in threads:
            thread.start()
        try:
            # Let both big accounts have one export running before the first small one.
            while sum(get_export(client, i)["state"] == "running" for i in list(big)) < 2:
                time.sleep(0.05)
            for n in range(args.lane_samples):
                posted_at = dt.datetime.now(dt.UTC)
                export = post_export(client, SMALL_ACCOUNT, {"max_total": str(2_000_000 + n)})
                while export["state"] in ("queued", "running"):
                    time.sleep(POLL_SECONDS)
                    export = get_export(client, export["id"])
                if export["state"] != "ready":
                    raise RuntimeError(f"small export ended {export['state']}: {export['error']}")
                claimed = dt.datetime.fromisoformat(export["started_at"])
                finished = dt.datetime.fromisoformat(export["finished_at"])
                wall = (finished - posted_at).total_seconds()
                running = 0
                for big_id in list(big):
                    other = get_export(client, big_id)
                    if other["started_at"] is None:
                        continue
                    start = dt.datetime.fromisoformat(other["started_at"])
                    end = other["finished_at"]
                    if start <= claimed and (
                        end is None or dt.datetime.fromisoformat(end) > claimed
                    ):
                        running += 1
                samples.append(
                    {
                        "wall_seconds": wall,
                        "queue_wait_seconds": (
                            claimed - dt.datetime.fromisoformat(export["created_at"])
                        ).total_seconds(),
                        "rows": export["row_count"],
                        "big_exports_running_at_claim": running,
                    }
                )
                time.sleep(0.2)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    results["lanes"] = {"samples": samples, "big_exports_posted": len(big)}


def summarize_lanes(lanes: dict[str, Any]) -> dict[str, Any]:
    samples = lanes["samples"]
    waits = [x["queue_wait_seconds"] for x in samples]
    walls = [x["wall_seconds"] for x in samples]
    return {
        "small_export_rows": samples[0]["rows"],
        "small_export_samples": len(samples),
        "small_queue_wait_p50_s": percentile(waits, 50),
        "small_queue_wait_p99_s": percentile(waits, 99),
        "small_post_to_ready_p50_s": percentile(walls, 50),
        "small_post_to_ready_p99_s": percentile(walls, 99),
        "small_min_big_running_at_claim": min(x["big_exports_running_at_claim"] for x in samples),
        "small_samples_claimed_beside_two_big": sum(
            x["big_exports_running_at_claim"] >= 2 for x in samples
        ),
        "big_exports_posted_meanwhile": lanes["big_exports_posted"],
    }


#: Worker processes of the scale-out part, and its load: exports of accounts of rows each.
SCALE_PROCESSES = (1, 2, 4)
SCALE_ACCOUNTS = 20
SCALE_EXPORTS = 40


def seed_scale_accounts(database_url: str, *, accounts: int, orders: int) -> None:
    """``accounts`` accounts of ``orders`` orders, the benchmark user admin of each; the search
    indexes are dropped for the whole load and built once at the end."""
    from sqlalchemy import text

    from shared.identity import ensure_account, find_user, set_membership
    from shared.models import Role
    from shared.seeding import build_search_indexes, drop_search_indexes, seed_orders

    engine = create_engine(sqlalchemy_url(database_url))
    with Session(engine) as session, session.begin():
        user = find_user(session, "admin@acme.test")
        assert user is not None
        drop_search_indexes(session)
        for n in range(accounts):
            account = ensure_account(session, slug=f"scale-{n:02d}", name=f"Scale {n}")
            set_membership(session, account=account, user=user, role=Role.ADMIN)
            seed_orders(session, account, orders=orders, seed=n, rebuild_index=False)
        session.execute(text("SET LOCAL maintenance_work_mem = '256MB'"))
        build_search_indexes(session)
        session.execute(text("ANALYZE orders"))
    engine.dispose()


def postgres_cpu_seconds(data_dir: Path) -> float:
    """User + system CPU of the stack's PostgreSQL so far: the server process (found by its
    data directory), its live backends, and the backends that already exited (the server reaps
    them, so their time is in its children's times)."""
    total = 0.0
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            if not (process.info["name"] or "").startswith("postgres"):
                continue
            if not any(str(data_dir) in arg for arg in process.info["cmdline"] or []):
                continue
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
            for child in process.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child_times = child.cpu_times()
                    total += child_times.user + child_times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def start_workers(env: dict[str, str], count: int) -> list[subprocess.Popen[bytes]]:
    """``count`` more worker processes on the stack (no metrics endpoint of their own)."""
    worker_env = cli_env(env)
    for name in ("METRICS_PORT", "METRICS_HOST", "PROMETHEUS_MULTIPROC_DIR"):
        worker_env.pop(name, None)
    return [
        subprocess.Popen(
            [sys.executable, "-m", "services.worker"],
            env=worker_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]


def scale_run(client: httpx2.Client, database_url: str, data_dir: Path, n: int) -> dict[str, Any]:
    """40 exports over 20 accounts posted at once; total time until the last is ready (from
    the jobs' own finished_at, polled in the database: 40 status requests every 100 ms would
    cost more CPU than the workers under test get)."""
    cpu_before = postgres_cpu_seconds(data_dir)
    posted_at = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    ids = [
        post_export(
            client,
            f"scale-{i % SCALE_ACCOUNTS:02d}",
            {"max_total": str(3_000_000 + 1000 * n + i)},  # distinct: no duplicate in flight
        )["id"]
        for i in range(SCALE_EXPORTS)
    ]
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE state IN ('queued', 'running')),"
                " count(*) FILTER (WHERE state NOT IN ('queued', 'running', 'ready')),"
                " coalesce(sum(row_count) FILTER (WHERE state = 'ready'), 0), max(finished_at)"
                " FROM export_jobs WHERE id = ANY(%s::uuid[])",
                (ids,),
            ).fetchone()
            assert row is not None
            active, failed, rows, last = row
            if failed:
                raise RuntimeError(f"{failed} scale-out exports did not end ready")
            if not active:
                break
            time.sleep(0.25)
    cpu = postgres_cpu_seconds(data_dir) - cpu_before
    wall = (last - posted_at).total_seconds()
    return {
        "total_seconds": wall,
        "observed_seconds": time.perf_counter() - started,
        "exports": SCALE_EXPORTS,
        "rows": int(rows),
        "exports_per_s": SCALE_EXPORTS / wall,
        "rows_per_s": int(rows) / wall,
        "database_cpu_seconds": cpu,
        "database_cpu_cores": cpu / wall,
    }


def scale_section(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """1, 2 and 4 worker processes against 40 exports of --scale-rows rows over 20 accounts."""
    extra_env = {"EXPORT_MAX_ACTIVE_PER_USER": str(SCALE_EXPORTS)}
    runs: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="export-bench-scale-") as tmp,
        dev_stack(0, Path(tmp), extra_env) as (stack, _),
    ):
        env = stack["env"]
        started = time.perf_counter()
        seed_scale_accounts(env["DATABASE_URL"], accounts=SCALE_ACCOUNTS, orders=args.scale_rows)
        results["scale_seed_seconds"] = time.perf_counter() - started
        token = cli(env, "tokens", "create", "--email", "admin@acme.test")
        headers = {"Authorization": f"Bearer {token}"}
        with httpx2.Client(
            base_url=stack["api_url"], headers=headers, timeout=120, trust_env=False
        ) as client:
            for n, processes in enumerate(SCALE_PROCESSES):
                extra = start_workers(env, processes - 1)
                try:
                    time.sleep(5 if extra else 0)  # let them boot and subscribe
                    runs[str(processes)] = scale_run(client, env["DATABASE_URL"], Path(tmp), n)
                finally:
                    for process in extra:
                        process.send_signal(signal.SIGTERM)
                    for process in extra:
                        process.wait(timeout=60)
    results["scale"] = {"rows_per_export": args.scale_rows, "by_processes": runs}


def summarize_scale(scale: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for processes, run in scale["by_processes"].items():
        summary[f"scale_{processes}p_total_s"] = run["total_seconds"]
        summary[f"scale_{processes}p_exports_per_s"] = run["exports_per_s"]
        summary[f"scale_{processes}p_rows_per_s"] = run["rows_per_s"]
        summary[f"scale_{processes}p_db_cpu_cores"] = run["database_cpu_cores"]
    return summary


def cpu_model() -> str | None:
    """The processor's name as Linux reports it (``/proc/cpuinfo``), if it does."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return None


def stolen_share(start: Any, end: Any) -> float | None:
    """Share of the machine's CPU time between two ``psutil.cpu_times()`` that the hypervisor
    gave to other guests (``steal``): a virtual machine whose host is busy runs slower by about
    that much, which no ratio measured in the run removes from its absolute figures."""
    total = sum(end) - sum(start)
    if not total or not hasattr(end, "steal"):
        return None
    return float((end.steal - start.steal) / total)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--load-seconds", type=float, default=10.0)
    parser.add_argument("--load-clients", type=int, default=8)
    parser.add_argument(
        "--skip-naive",
        action="store_true",
        help="skip the slow naive peers (e.g. with --rows 5000000)",
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated parts to run (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--scale-rows", type=int, default=100_000, help="rows of each scale-out export"
    )
    parser.add_argument(
        "--lane-samples", type=int, default=10, help="small exports timed under the backlog"
    )
    parser.add_argument(
        "--output", type=Path, help="results file (default benchmarks/results/export-<rows>.json)"
    )
    args = parser.parse_args()
    sections = [part for part in args.only.split(",") if part]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")

    results: dict[str, Any] = {"rows": args.rows, "runs": args.runs, "sections": sections}
    cpu_at_start = psutil.cpu_times()
    if {"export", "report", "lanes"} & set(sections):
        with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
            seeded = time.perf_counter()
            with dev_stack(args.rows, Path(tmp), {}) as (stack, dev):
                results["stack_start_seconds"] = time.perf_counter() - seeded
                token = cli(stack["env"], "tokens", "create", "--email", "admin@acme.test")
                if "export" in sections:
                    export_section(args, results, stack, dev, token)
                if "report" in sections:
                    report_section(args, results, stack, token)
                if "lanes" in sections:
                    lanes_section(args, results, stack, token)
    if "scale" in sections:
        scale_section(args, results)

    summary = summarize(results)
    results["summary"] = summary
    results["machine"] = {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "system": platform.platform(),
        "cpu_model": cpu_model(),
        "load_average_at_end": os.getloadavg(),
        "cpu_stolen_share": stolen_share(cpu_at_start, psutil.cpu_times()),
    }
    RESULTS.mkdir(exist_ok=True)
    out = args.output or RESULTS / f"export-{args.rows}.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_table(summary)
    for row in results.get("report_by_query_idle", []):
        print(f"idle {row['query']}: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms")
    for plan in results.get("report_plans_exporting", []):
        print(f"\n{plan['query']}: {plan['execution_ms']:.1f} ms")
        print("\n".join(plan["plan"]))
    print(f"\nwritten to {out.resolve()}")
    return 0


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    if "export_runs" in r:
        summary.update(summarize_export(r))
    if "report_latencies_idle" in r:
        idle, busy = r["report_latencies_idle"], r["report_latencies_exporting"]
        summary.update(
            {
                "report_p50_ms_idle": 1000 * percentile(idle, 50),
                "report_p99_ms_idle": 1000 * percentile(idle, 99),
                "report_p50_ms_exporting": 1000 * percentile(busy, 50),
                "report_p99_ms_exporting": 1000 * percentile(busy, 99),
                "report_requests_idle": len(idle),
                "report_requests_exporting": len(busy),
                "report_exports_during_load": len(r.get("report_background_exports", [])),
                "report_cold_max_ms": max(r.get("report_cold_ms") or [0.0]),
            }
        )
        summary["ratio_report_p99_exporting_to_idle"] = (
            summary["report_p99_ms_exporting"] / summary["report_p99_ms_idle"]
        )
    if "lanes" in r:
        summary.update(summarize_lanes(r["lanes"]))
    if "scale" in r:
        summary.update(summarize_scale(r["scale"]))
    return summary


def summarize_export(r: dict[str, Any]) -> dict[str, Any]:
    runs = r["export_runs"]
    wall = statistics.median(x["wall_seconds"] for x in runs)
    worker = statistics.median(x["worker_seconds"] for x in runs)
    mb = runs[0]["bytes"] / 1e6
    gzip_wall = statistics.median(x["wall_seconds"] for x in r["gzip_runs"])
    gzip_mb = r["gzip_runs"][0]["bytes"] / 1e6
    return {
        "floor_copy_s": r["floor_seconds"],
        "floor_copy_psycopg_reader_s": r.get("floor_psycopg_seconds"),
        "raw_copy_select_star_s": r["raw_copy_seconds"],
        "naive_cursor_csv_writer_s": r.get("naive_cursor_seconds"),
        "naive_orm_yield_per_s": r.get("naive_orm_seconds"),
        "export_wall_post_to_ready_s": wall,
        "export_worker_s": worker,
        "queue_wait_s": statistics.median(x["queue_wait_seconds"] for x in runs),
        "ratio_wall_to_floor": wall / r["floor_seconds"],
        "ratio_naive_cursor_to_wall": (r["naive_cursor_seconds"] / wall)
        if r.get("naive_cursor_seconds")
        else None,
        "ratio_naive_orm_to_wall": (r["naive_orm_seconds"] / wall)
        if r.get("naive_orm_seconds")
        else None,
        "rows_per_s": runs[0]["rows"] / worker,
        "mb_per_s": mb / worker,
        "file_mb": mb,
        "post_p50_ms": 1000 * percentile(r["post_latencies_seconds"], 50),
        "post_p99_ms": 1000 * percentile(r["post_latencies_seconds"], 99),
        "posts_claimed_before_cancel": r["posts_claimed_before_cancel"],
        "worker_peak_rss_mib": r["worker_peak_rss_mib"],
        "max_progress_gap_s": runs[0]["max_progress_gap_seconds"],
        **downloads.summarize(r, runs[0]["bytes"]),
        "gzip_export_wall_post_to_ready_s": gzip_wall,
        "ratio_gzip_wall_to_plain_wall": gzip_wall / wall,
        "gzip_file_mb": gzip_mb,
        "ratio_gzip_size_to_plain_size": gzip_mb / mb,
    }


def print_table(summary: dict[str, Any]) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        shown = (
            "—"
            if value is None
            else (f"{value:,.3f}" if isinstance(value, float) else f"{value:,}")
        )
        print(f"{key.ljust(width)}  {shown}")


if __name__ == "__main__":
    sys.exit(main())
