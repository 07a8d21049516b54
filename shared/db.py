"""Database engines and sessions (SQLAlchemy 2 over psycopg 3)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

#: Connections kept open per process by the pool.
POOL_SIZE = 10
#: Longest a checkout waits for a free connection (seconds; SQLAlchemy's own default).
POOL_TIMEOUT_SECONDS = 30.0


def sqlalchemy_url(database_url: str) -> str:
    """Turn a libpq-style ``postgresql://`` URL into SQLAlchemy's psycopg 3 dialect URL."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + database_url[len(prefix) :]
    raise ValueError("not a PostgreSQL URL")


def libpq_url(database_url: str) -> str:
    """The URL as psycopg's own ``connect()`` takes it."""
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def make_engine(
    database_url: str, *, pool_size: int = POOL_SIZE, pool_timeout: float = POOL_TIMEOUT_SECONDS
) -> Engine:
    """An engine with a pool that checks connections before use (servers restart); a checkout
    waits at most ``pool_timeout`` seconds (then ``sqlalchemy.exc.TimeoutError``)."""
    return create_engine(
        sqlalchemy_url(database_url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=pool_timeout,
        pool_pre_ping=True,
        # Errors and logs show the SQL, never the values (emails, tokens' digests, filters).
        hide_parameters=True,
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on error."""
    with factory() as session, session.begin():
        yield session


def warm_up(engine: Engine, *, connections: int = 2) -> None:
    """Pay the one-time costs before the first request: the ORM's mapper configuration and a
    few pooled connections (each a TCP + authentication round trip). A database that is not
    there yet is not an error here (``/readyz`` reports it; the pool connects later)."""
    from sqlalchemy import exc, text
    from sqlalchemy.orm import configure_mappers

    configure_mappers()
    opened = []
    try:
        for _ in range(connections):
            conn = engine.connect()
            opened.append(conn)
            conn.execute(text("SELECT 1"))
    except exc.OperationalError:
        pass
    finally:
        for conn in opened:
            conn.close()
