"""One live stack for every fault test (they run one after the other and leave it healthy).

The worker reaches S3 through :class:`S3FaultProxy`, so a test can break one upload half-way;
the API and the tests talk to the moto server directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.db import make_engine, make_sessionmaker, transaction
from shared.identity import ensure_account, find_user, set_membership
from shared.models import Role
from shared.seeding import DEMO_ADMIN, seed_orders
from shared.storage import storage_from_url
from tests.faults.support import S3FaultProxy
from tests.support.stack import LiveStack

#: Orders of the demo account: a full export is ~60,000 rows, ~8 MB (a two-part upload).
ORDERS = 60_000
#: More accounts of the demo admin (one export runs per account at a time): slug -> orders.
OTHER_ACCOUNTS = {"beta": 25_000, "gamma": 25_000}
#: Streaming cap: ~2 MB/s stretches a full export to a few seconds, so faults can hit it
#: mid-flight; the smallest S3 part size (5 MiB) makes big files multipart uploads. The fast
#: lane takes exports of at most 1,000 rows here, so the exports of these tests (thousands of
#: rows) share the normal lane's two threads as the tests expect; the fast lane has tests of
#: its own (tests/integration/test_fast_lane.py).
FAULT_ENV = {
    "EXPORT_MAX_BYTES_PER_SECOND": "2000000",
    "STORAGE_PART_SIZE_MIB": "5",
    "EXPORT_FAST_LANE_MAX_ROWS": "1000",
}


@pytest.fixture(scope="package")
def proxy_and_stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[S3FaultProxy, LiveStack]]:
    live = LiveStack(Path(tmp_path_factory.mktemp("faults")), orders=ORDERS, env=FAULT_ENV)
    proxy = S3FaultProxy(upstream_port=live.s3_port).start()
    try:
        live.start()
        storage_from_url(live.env["STORAGE_URL"]).prepare()  # the bucket, before any request
        seed_other_accounts(live)
        live.env["STORAGE_URL"] = proxy.storage_url()
        live.restart_service("worker")
        yield proxy, live
    finally:
        live.stop()
        proxy.stop()


def seed_other_accounts(live: LiveStack) -> None:
    engine = make_engine(live.database_url, pool_size=1)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            admin = find_user(session, DEMO_ADMIN[0])
            assert admin is not None
            for number, (slug, orders) in enumerate(OTHER_ACCOUNTS.items(), start=1):
                account = ensure_account(session, slug=slug, timezone="America/New_York")
                set_membership(session, account=account, user=admin, role=Role.ADMIN)
                seed_orders(session, account, orders=orders, seed=number)
    finally:
        engine.dispose()


@pytest.fixture(scope="package")
def stack(proxy_and_stack: tuple[S3FaultProxy, LiveStack]) -> LiveStack:
    return proxy_and_stack[1]


@pytest.fixture(scope="package")
def s3_proxy(proxy_and_stack: tuple[S3FaultProxy, LiveStack]) -> S3FaultProxy:
    return proxy_and_stack[0]
