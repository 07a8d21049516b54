"""copy_rows never ends quietly without the COPY's final result (a fake libpq connection)."""

from __future__ import annotations

import os
from typing import Any

import psycopg
import pytest
from psycopg import pq

from shared.csvfile import copy_rows


class FakeResult:
    def __init__(self, status: pq.ExecStatus) -> None:
        self.status = status


class FakePGconn:
    """Hands out ``rows``, then ``end`` from get_copy_data, then ``results`` from get_result."""

    def __init__(self, rows: list[bytes], end: int, results: list[FakeResult]) -> None:
        self._rows = list(rows)
        self._end = end
        self._results = list(results)
        self._read, self._write = os.pipe()  # a real descriptor for poll()
        self.socket = self._read

    def get_copy_data(self, async_: int) -> tuple[int, memoryview]:
        if self._rows:
            row = self._rows.pop(0)
            return len(row), memoryview(row)
        return self._end, memoryview(b"")

    def consume_input(self) -> None:
        pass

    def is_busy(self) -> bool:
        return False

    def get_result(self) -> FakeResult | None:
        return self._results.pop(0) if self._results else None

    def get_error_message(self, encoding: str = "utf-8") -> str:
        return "server closed the connection unexpectedly"


class FakeConn:
    def __init__(self, pgconn: FakePGconn) -> None:
        self.pgconn = pgconn


def rows_of(pgconn: FakePGconn) -> list[bytes]:
    conn: Any = FakeConn(pgconn)
    return [bytes(row) for row in copy_rows(conn)]


def test_rows_then_the_final_command_ok() -> None:
    pgconn = FakePGconn([b"a\n", b"b\n"], -1, [FakeResult(pq.ExecStatus.COMMAND_OK)])
    assert rows_of(pgconn) == [b"a\n", b"b\n"]


@pytest.mark.parametrize("end", [-1, -2])
def test_an_end_without_any_result_is_an_error_not_a_short_file(end: int) -> None:
    """libpq's -2 (or a -1 whose result never comes) must not pass for a complete COPY."""
    pgconn = FakePGconn([b"a\n"], end, [])
    with pytest.raises(psycopg.OperationalError, match="server closed the connection"):
        rows_of(pgconn)
