"""The 500k-row export benchmark: the product end to end against the physical floor and the
way most apps do it, measured side by side in ONE run on the embedded local stack.

    python benchmarks/export.py [--rows 500000] [--runs 3] [--load-seconds 10]

1. starts ``orders-export dev`` (embedded PostgreSQL, Redis, Kafka-protocol broker, ...) with
   ``--rows`` demo orders in the account ``acme``;
2. floor: the report's own ``COPY (SELECT <report columns> ...) TO STDOUT`` into /dev/null
   through psycopg (and a raw ``COPY (SELECT *)`` for reference), no job machinery;
3. naive peers: a server-side cursor + csv.writer, and SQLAlchemy ORM ``yield_per`` +
   csv.writer, formatting values in Python as the report shows them;
4. the product over HTTP: POST -> ready wall time, the worker's own time, rows/s, MB/s, queue
   wait, POST latency p50/p99, peak RSS of the worker process, progress update gaps;
5. the report API's p50/p99 under steady concurrent load, without and with exports running;
6. downloads (``benchmarks/downloads.py``): the file through the API, streamed from local and
   from S3 storage and redirected to S3, each against reading the same bytes from storage
   directly, and against a zero-copy HTTP server (curl is the client of every path);
7. gzip: the same export with ``options.compression = "gzip"``, POST -> ready and file size
   against the plain one.

Prints a table and writes ``benchmarks/results/export-<rows>.json``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
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

from shared.csvfile import copy_statement
from shared.db import sqlalchemy_url
from shared.filters import OrderFilters
from shared.models import Account, ExportJob, Order

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
READY = re.compile(r"ready (http://127\.0\.0\.1:\d+)")
#: Variables that would make ``dev`` join outside servers.
STACK_VARIABLES = (
    "DATABASE_URL",
    "REDIS_URL",
    "KAFKA_BOOTSTRAP_SERVERS",
    "STORAGE_URL",
    "SMTP_URL",
    "SECRET_KEY",
    "PUBLIC_URL",
)
#: Report queries the load generator cycles through (one page each).
REPORT_QUERIES = (
    {},
    {"status": "paid"},
    {"channel": ["web", "pos"], "sort": "-total"},
    {"placed_from": "2025-06-01", "placed_to": "2025-06-30"},
    {"min_total": "100", "max_total": "300", "sort": "number"},
    {"q": "lovelace"},
)
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
    env = {k: v for k, v in os.environ.items() if k not in STACK_VARIABLES}
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


def floor_copy(database_url: str, account: Account) -> int:
    statement, params = copy_statement(account, OrderFilters())
    rows = 0
    with (
        psycopg.connect(database_url) as conn,
        open(os.devnull, "wb") as sink,
        psycopg.ClientCursor(conn).copy(statement, params) as copy,
    ):
        for chunk in copy:
            sink.write(chunk)
            rows += 1
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
        time.sleep(0.01 if not watch_progress else 0.05)
        export = client.get(f"/api/v1/order-exports/{export['id']}").json()["export"]
        if (
            watch_progress
            and export["state"] == "running"
            and export["progress"]["rows_written"] != last_rows
        ):
            last_rows = export["progress"]["rows_written"]
            changes.append(time.perf_counter())
    wall = time.perf_counter() - started
    if export["state"] != "ready":
        raise RuntimeError(f"export ended {export['state']}: {export['error']}")
    created = dt.datetime.fromisoformat(export["created_at"])
    begun = dt.datetime.fromisoformat(export["started_at"])
    finished = dt.datetime.fromisoformat(export["finished_at"])
    gaps = [b - a for a, b in itertools.pairwise(changes)]
    return {
        "id": export["id"],
        "download_url": export["download_url"],
        "wall_seconds": wall,
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


def post_latencies(client: httpx2.Client, count: int) -> list[float]:
    """POST latency of background exports (each canceled at once to stay under the cap)."""
    latencies = []
    for n in range(count):
        started = time.perf_counter()
        response = client.post(
            "/api/v1/accounts/acme/order-exports", json={"filters": {"min_total": str(n + 1)}}
        )
        latencies.append(time.perf_counter() - started)
        response.raise_for_status()
        client.post(f"/api/v1/order-exports/{response.json()['export']['id']}/cancel")
    return latencies


def report_load(
    api_url: str,
    token: str,
    *,
    clients: int,
    seconds: float,
    background: Callable[[threading.Event], None] | None,
) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop(n: int) -> None:
        with httpx2.Client(
            base_url=api_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            trust_env=False,
        ) as c:
            i = n
            while not stop.is_set():
                started = time.perf_counter()
                c.get(
                    "/api/v1/accounts/acme/orders", params=REPORT_QUERIES[i % len(REPORT_QUERIES)]
                ).raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - started)
                i += 1

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(clients)]
    if background is not None:
        threads.append(threading.Thread(target=background, args=(stop,)))
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return latencies


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
    args = parser.parse_args()

    results: dict[str, Any] = {"rows": args.rows, "runs": args.runs}
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        seeded = time.perf_counter()
        with dev_stack(args.rows, Path(tmp), {}) as (stack, dev):
            results["stack_start_seconds"] = time.perf_counter() - seeded
            env = stack["env"]
            database_url = env["DATABASE_URL"]
            account = account_of(database_url)
            token = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "shared.cli",
                    "tokens",
                    "create",
                    "--email",
                    "admin@acme.test",
                ],
                env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            assert floor_copy(database_url, account) == args.rows
            results["floor_seconds"], results["floor_runs"] = median_time(
                lambda: floor_copy(database_url, account), args.runs
            )
            results["raw_copy_seconds"], _ = median_time(
                lambda: raw_copy(database_url, account), args.runs
            )
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
                runs = [run_export(client, {}, watch_progress=(n == 0)) for n in range(args.runs)]
                results["export_runs"] = runs
                results["gzip_runs"] = [
                    run_export(client, {}, options={"compression": "gzip"})
                    for _ in range(args.runs)
                ]
                results |= downloads.measure(
                    env=env,
                    token=token,
                    download_url=runs[0]["download_url"],
                    key=storage_key(database_url, runs[0]["id"]),
                    size=runs[0]["bytes"],
                    runs=args.runs,
                )
                results["post_latencies_seconds"] = post_latencies(client, 50)
            results["worker_peak_rss_mib"] = peak_rss_mib(worker_process(dev))

            results["report_latencies_idle"] = report_load(
                stack["api_url"],
                token,
                clients=args.load_clients,
                seconds=args.load_seconds,
                background=None,
            )

            def exports_running(stop: threading.Event) -> None:
                with httpx2.Client(
                    base_url=stack["api_url"], headers=headers, timeout=120, trust_env=False
                ) as c:
                    while not stop.is_set():
                        run_export(c, {})

            results["report_latencies_exporting"] = report_load(
                stack["api_url"],
                token,
                clients=args.load_clients,
                seconds=args.load_seconds,
                background=exports_running,
            )

    summary = summarize(results)
    results["summary"] = summary
    results["machine"] = {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "system": platform.platform(),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"export-{args.rows}.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_table(summary)
    print(f"\nwritten to {out.relative_to(ROOT)}")
    return 0


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    runs = r["export_runs"]
    wall = statistics.median(x["wall_seconds"] for x in runs)
    worker = statistics.median(x["worker_seconds"] for x in runs)
    mb = runs[0]["bytes"] / 1e6
    idle, busy = r["report_latencies_idle"], r["report_latencies_exporting"]
    gzip_wall = statistics.median(x["wall_seconds"] for x in r["gzip_runs"])
    gzip_mb = r["gzip_runs"][0]["bytes"] / 1e6
    summary = {
        "floor_copy_s": r["floor_seconds"],
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
        "worker_peak_rss_mib": r["worker_peak_rss_mib"],
        "max_progress_gap_s": runs[0]["max_progress_gap_seconds"],
        "report_p50_ms_idle": 1000 * percentile(idle, 50),
        "report_p99_ms_idle": 1000 * percentile(idle, 99),
        "report_p50_ms_exporting": 1000 * percentile(busy, 50),
        "report_p99_ms_exporting": 1000 * percentile(busy, 99),
        "report_requests_idle": len(idle),
        "report_requests_exporting": len(busy),
        **downloads.summarize(r, runs[0]["bytes"]),
        "gzip_export_wall_post_to_ready_s": gzip_wall,
        "ratio_gzip_wall_to_plain_wall": gzip_wall / wall,
        "gzip_file_mb": gzip_mb,
        "ratio_gzip_size_to_plain_size": gzip_mb / mb,
    }
    summary["ratio_report_p99_exporting_to_idle"] = (
        summary["report_p99_ms_exporting"] / summary["report_p99_ms_idle"]
    )
    return summary


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
