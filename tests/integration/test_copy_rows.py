"""copy_rows: the rows of a running COPY TO STDOUT, read from libpq one call per buffered row.

Against a real PostgreSQL: the same bytes and rows as psycopg's own ``Copy`` iteration, and the
end of the COPY and its failures as psycopg reports them (its exception classes, a usable
connection afterwards).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from shared.csvfile import copy_rows

#: Rows with what CSV makes hard: quotes, commas, newlines inside a value, empty and NULL
#: values, long values (many socket reads per row) and non-ASCII text.
ODD_ROWS = """
    SELECT g,
           CASE WHEN g % 5 = 0 THEN E'line one\\nline "two", three' END,
           CASE WHEN g % 7 = 0 THEN '' ELSE 'naïve café ' || g END,
           CASE WHEN g % 500 = 0 THEN repeat('x', 200000) END
    FROM generate_series(1, 3000) AS g ORDER BY g
"""


def copy_of(query: str) -> str:
    return f"COPY ({query}) TO STDOUT (FORMAT csv)"


#: A COPY that would take 1,000 s: 100,000 rows, 10 ms each.
SLOW = copy_of("SELECT g, pg_sleep(0.01) FROM generate_series(1, 100000) AS g")


def psycopg_rows(conn: psycopg.Connection[Any], statement: str) -> list[bytes]:
    with conn.cursor().copy(statement) as copy:
        return [bytes(row) for row in copy]


def our_rows(conn: psycopg.Connection[Any], statement: str) -> list[bytes]:
    with conn.cursor().copy(statement):
        return [bytes(row) for row in copy_rows(conn)]


def test_the_same_rows_and_bytes_as_psycopgs_own_iteration(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        expected = psycopg_rows(conn, copy_of(ODD_ROWS))
        got = our_rows(conn, copy_of(ODD_ROWS))
        assert len(expected) == 3000
        assert got == expected
        # The COPY is over and the connection is usable for the next statement.
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)


def test_an_empty_copy_ends_at_once(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        assert our_rows(conn, copy_of("SELECT 1 WHERE false")) == []
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_an_error_in_the_middle_raises_psycopgs_exception_after_the_rows_before_it(
    database_url: str,
) -> None:
    # No ORDER BY: a sort would compute every row (and fail) before the first is sent.
    statement = copy_of("SELECT repeat('x', 100), 1 / (2000 - g) FROM generate_series(1, 5000) g")
    seen = 0
    with psycopg.connect(database_url) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero) as raised, conn.cursor().copy(statement):
            for _ in copy_rows(conn):
                seen += 1
        assert raised.value.sqlstate == "22012"
        assert 0 < seen < 2000  # the rows sent before the failing one came through
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_cancel_from_another_thread_raises_query_canceled(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        started = threading.Event()
        canceller = threading.Thread(target=lambda: started.wait(10) and conn.cancel_safe())
        canceller.start()
        begun = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled), conn.cursor().copy(SLOW):
            for _ in copy_rows(conn):
                started.set()
        canceller.join(timeout=10)
        assert time.monotonic() - begun < 30  # not the 1,000 s the COPY would take
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_statement_timeout_during_the_copy_raises_query_canceled(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("SET statement_timeout = 300")
        timeout = pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout")
        with timeout, conn.cursor().copy(SLOW):
            for _ in copy_rows(conn):
                pass


def test_a_connection_killed_mid_copy_raises_operational_error(database_url: str) -> None:
    with psycopg.connect(database_url) as conn, psycopg.connect(database_url) as admin:
        admin.autocommit = True
        pid = conn.info.backend_pid
        with pytest.raises(psycopg.OperationalError), conn.cursor().copy(SLOW):
            for n, _ in enumerate(copy_rows(conn)):
                if n == 10:
                    admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        assert conn.closed or conn.broken


def test_an_exception_sent_to_the_waiting_thread_lands_while_the_server_is_silent(
    database_url: str,
) -> None:
    """Dramatiq's time limit raises in the worker thread; a thread waiting for rows that do not
    come must still run Python often enough to receive it (here: long before the next row)."""
    from dramatiq.middleware import TimeLimitExceeded, raise_thread_exception

    # The server sends nothing before 8 kB of output: a long first row starts the COPY, then
    # the next row takes 20 s.
    silent = copy_of(
        "SELECT CASE WHEN g = 1 THEN repeat('x', 100000) ELSE pg_sleep(20)::text END"
        " FROM generate_series(1, 3) AS g"
    )
    outcome: list[BaseException] = []
    waiting = threading.Event()

    def read() -> None:
        with psycopg.connect(database_url) as conn:
            try:
                with conn.cursor().copy(silent):
                    waiting.set()
                    for _ in copy_rows(conn):
                        pass
            except BaseException as exc:  # what the worker thread would see
                outcome.append(exc)
                conn.cancel_safe()

    thread = threading.Thread(target=read)
    thread.start()
    assert waiting.wait(10)
    time.sleep(0.5)  # inside copy_rows, waiting for the second row
    sent = time.monotonic()
    assert thread.ident is not None
    raise_thread_exception(thread.ident, TimeLimitExceeded)
    thread.join(timeout=15)
    assert not thread.is_alive()
    assert [type(exc) for exc in outcome] == [TimeLimitExceeded]
    assert time.monotonic() - sent < 5  # not the 20 s until the server sends a row
