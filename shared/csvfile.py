"""The CSV file of an export: one ``COPY (SELECT ...) TO STDOUT`` streamed into storage.

PostgreSQL renders every value (the same display expressions as the report, plus the formula
guard on text cells) and quotes the CSV; Python only counts rows, hashes bytes and hands the
stream to storage in large reads. Memory stays constant whatever the row count.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from select import POLLIN, poll
from typing import Any

import psycopg
from psycopg import pq
from psycopg_pool import ConnectionPool
from sqlalchemy import ClauseElement, select
from sqlalchemy.dialects import postgresql

from shared.columns import COLUMNS
from shared.export_options import COMPRESSIONS
from shared.filters import OrderFilters
from shared.models import Account, Order
from shared.report import count_select, filter_conditions, report_select, size_of

#: UTF-8 byte order mark, written first when the user asks for it (Excel on Windows).
UTF8_BOM = b"\xef\xbb\xbf"
#: Size of the reads storage makes from the COPY stream (bytes).
READ_SIZE = 1024 * 1024
#: zlib level of ``options.compression = "gzip"`` (gzip's own default: 6).
GZIP_LEVEL = 6
#: Longest single wait for the server's next rows (ms): a thread waiting in :func:`copy_rows`
#: runs Python this often, so an exception sent to it (Dramatiq's time limit) lands.
WAIT_INTERVAL_MS = 100


@dataclass(frozen=True)
class CsvFile:
    """What was written: rows (without header), bytes and their SHA-256."""

    row_count: int
    size_bytes: int
    sha256: str


def header_line(timezone: str) -> bytes:
    """The header row, quoted by the csv module exactly as COPY quotes values."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([c.label_for(timezone) for c in COLUMNS])
    return buffer.getvalue().encode()


def for_psycopg(query: ClauseElement) -> tuple[str, dict[str, Any]]:
    """SQL text with psycopg ``%(name)s`` placeholders, and its parameters."""
    compiled = query.compile(
        dialect=postgresql.psycopg.dialect(),  # type: ignore[no-untyped-call]
        compile_kwargs={"render_postcompile": True},
    )
    return str(compiled), dict(compiled.params)


def copy_statement(
    account: Account, filters: OrderFilters, *, limit: int | None = None
) -> tuple[str, dict[str, Any]]:
    """``COPY (<report query>) TO STDOUT`` and its parameters."""
    query = report_select(account, filters, guard_formulas=True)
    if limit is not None:
        query = query.limit(limit)
    sql, params = for_psycopg(query)
    return f"COPY ({sql}) TO STDOUT (FORMAT csv)", params


def copy_rows(conn: psycopg.Connection[Any]) -> Iterator[memoryview]:
    """The rows of the ``COPY ... TO STDOUT`` running on ``conn`` (begun by ``cursor.copy``).

    psycopg's own ``Copy`` iteration pays a lock, two generators and its wait loop for every
    row (~0.7 µs of CPU here: 3.5 s at 5M rows, more than hashing and writing the file), and a
    worker's CPU is taken from the PostgreSQL backend formatting the CSV when both share a host
    (``docs/performance.md``). Here each row libpq already holds costs one call
    (``PGconn.get_copy_data``), and the socket is waited for only when none is buffered. The
    end is as psycopg makes it: the final results are read, and an error result (a cancel, the
    statement timeout, a failing expression) raises psycopg's exception for its SQLSTATE; a
    lost connection raises ``OperationalError``.
    """
    pgconn = conn.pgconn
    poller = poll()
    poller.register(pgconn.socket, POLLIN)

    def wait() -> None:
        poller.poll(WAIT_INTERVAL_MS)
        pgconn.consume_input()

    get = pgconn.get_copy_data
    while True:
        nbytes, data = get(1)
        if nbytes > 0:
            yield data
        elif nbytes == 0:  # nothing buffered: wait for the server
            wait()
        else:  # -1: the COPY is over (or failed); -2: libpq's own error
            break
    error: psycopg.Error | None = None
    completed = False
    while True:
        while pgconn.is_busy():
            wait()
        result = pgconn.get_result()
        if result is None:
            break
        if result.status == pq.ExecStatus.COMMAND_OK:
            completed = True
        elif error is None:
            error = psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
    if error is not None:
        raise error
    if not completed:  # never a short file passed off as the whole COPY
        raise psycopg.OperationalError(
            f"the COPY ended without its final result: {pgconn.get_error_message()}"
        )


class CopyStream(io.RawIOBase):
    """A readable stream over a COPY: header, then one CopyData message per row.

    ``rows`` counts COPY messages (PostgreSQL sends exactly one per row in text/CSV format, even
    when a value contains newlines), so progress is exact and costs nothing.
    """

    def __init__(
        self, *, chunks: Iterator[Any], prefix: bytes, stopped: Callable[[], bool] = bool
    ) -> None:
        super().__init__()
        self._chunks = chunks
        self._stopped = stopped
        self._pending = memoryview(prefix)
        self._digest = hashlib.sha256()
        self.size = 0
        self.rows = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        filled = self._fill(target)
        self.size += filled
        self._digest.update(target[:filled])
        return filled

    def _fill(self, target: memoryview) -> int:
        # Hot path: one call per ~1 MiB read, one loop turn per row. Rows are copied into the
        # caller's buffer; hashing and counting happen once per call, not once per row.
        if self._stopped():  # canceled: do not drain what the socket still holds
            raise psycopg.errors.QueryCanceled("the export was stopped")
        space = len(target)
        filled = min(len(self._pending), space)
        target[:filled] = self._pending[:filled]
        self._pending = self._pending[filled:]
        rows = 0
        chunks = self._chunks
        while filled < space:
            chunk = next(chunks, None)
            if chunk is None:
                break
            rows += 1
            end = filled + len(chunk)
            if end <= space:
                target[filled:end] = chunk
                filled = end
            else:  # the row does not fit: keep the rest for the next call
                view = memoryview(chunk)
                target[filled:] = view[: space - filled]
                self._pending = view[space - filled :]
                filled = space
        self.rows += rows
        return filled

    @property
    def sha256(self) -> str:
        """SHA-256 of the bytes read so far (what storage stores)."""
        return self._digest.hexdigest()


class GzipCopyStream(CopyStream):
    """The same CSV bytes, gzip-compressed as they stream (constant memory).

    ``size`` and ``sha256`` describe the compressed bytes (what storage stores); ``rows`` counts
    rows as :class:`CopyStream` does. The gzip header carries no name and no time, so the same
    CSV always compresses to the same bytes.
    """

    def __init__(
        self,
        *,
        chunks: Iterator[Any],
        prefix: bytes,
        stopped: Callable[[], bool] = bool,
        level: int = GZIP_LEVEL,
    ) -> None:
        super().__init__(chunks=chunks, prefix=prefix, stopped=stopped)
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        self._plain = bytearray(READ_SIZE)
        self._out = memoryview(b"")
        self._flushed = False

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        while not self._out and not self._flushed:
            count = self._fill(memoryview(self._plain))
            if count:
                self._out = memoryview(self._compressor.compress(memoryview(self._plain)[:count]))
            else:
                self._out = memoryview(self._compressor.flush())
                self._flushed = True
        count = min(len(target), len(self._out))
        target[:count] = self._out[:count]
        self._out = self._out[count:]
        self.size += count
        self._digest.update(target[:count])
        return count


class Throttled(io.RawIOBase):
    """Passes reads through at no more than ``bytes_per_second`` (token bucket, 1 s burst)."""

    def __init__(self, stream: io.RawIOBase, *, bytes_per_second: int) -> None:
        super().__init__()
        self._stream = stream
        self._rate = bytes_per_second
        self._started = time.monotonic()
        self._sent = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[: max(1, self._rate // 4)]
        count = self._stream.readinto(view) or 0
        self._sent += count
        ahead = self._sent / self._rate - (time.monotonic() - self._started)
        if ahead > 0:
            time.sleep(ahead)
        return count


#: Longest wait for the export database to accept a connection (seconds).
CONNECT_TIMEOUT_SECONDS = 10
#: libpq TCP options of export connections: a database host that vanishes silently mid-COPY
#: (no FIN, no RST) breaks the connection within ~30 s instead of blocking the read forever
#: (``statement_timeout`` is server-side and cannot fire then). No effect on Unix sockets.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # milliseconds
}


def inline_pool(database_url: str, *, size: int) -> ConnectionPool[psycopg.Connection[Any]]:
    """The API's pool of export connections for small exports made inside requests (opened
    now, closed with the app): no new connection per request, and never more than ``size``."""
    return ConnectionPool(
        database_url,
        min_size=1,
        max_size=size,
        kwargs={
            "autocommit": False,
            "application_name": "orders-export-inline",
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            **KEEPALIVES,
        },
        name="inline-exports",
        open=True,
    )


class ExportQuery:
    """A read-only, snapshot-consistent connection that counts then copies the export's rows.

    ``cancel()`` may be called from another thread to stop a running COPY within moments.
    """

    def __init__(
        self,
        *,
        database_url: str,
        statement_timeout_seconds: int,
        pool: ConnectionPool[psycopg.Connection[Any]] | None = None,
    ) -> None:
        #: With ``pool`` (exports made inside API requests) the connection is borrowed and given
        #: back; without it (the workers: one long COPY each) it is opened for this export.
        self._pool = pool
        self._conn: psycopg.Connection[Any]
        if pool is not None:
            self._conn = pool.getconn(timeout=CONNECT_TIMEOUT_SECONDS)
        else:
            self._conn = psycopg.connect(
                database_url,
                autocommit=False,
                application_name="orders-export-worker",
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                **KEEPALIVES,
            )
        self._timeout_ms = statement_timeout_seconds * 1000
        self._lock = threading.Lock()
        self._stream: CopyStream | None = None
        self.canceled = False

    @property
    def rows_written(self) -> int:
        """Rows streamed so far (read by the heartbeat thread)."""
        return self._stream.rows if self._stream else 0

    def fileno(self) -> int:
        """The connection's socket (tests check its TCP options)."""
        return self._conn.fileno()

    def __enter__(self) -> ExportQuery:
        # One snapshot for the count and the COPY: the estimate is the exact row count.
        self._conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        self._conn.execute(f"SET LOCAL statement_timeout = {int(self._timeout_ms)}")
        return self

    def __exit__(self, *exc: object) -> None:
        # Read-only work: closing (or rolling back) discards it. A connection the server killed
        # is just closed; the pool drops a broken one instead of lending it again.
        if self._pool is None:
            self._conn.close()
            return
        with contextlib.suppress(psycopg.Error):  # broken: putconn sees it and discards it
            self._conn.rollback()
        self._pool.putconn(self._conn)

    def estimate(self, account: Account, filters: OrderFilters, *, exact_up_to: int) -> int:
        """The row count for progress: exact when small (a bounded count), else the planner's
        estimate, so a big export never pays for a second pass over its rows.

        The rule is the request's (:func:`shared.report.size_of`): the planner first, a bounded
        count only where its estimate cannot settle it. Only the progress total depends on it;
        the file and its row count come from the COPY."""

        def count(bound: int) -> int:
            sql, params = for_psycopg(count_select(account, filters, bound=bound))
            row = self._conn.execute(sql, params).fetchone()
            return int(row[0]) if row else 0

        size = size_of(
            filters,
            bound=exact_up_to,
            estimate=lambda: self._planned(account, filters),
            count=count,
        )
        if size.rows <= exact_up_to:
            return size.rows
        assert size.estimate is not None  # asked whenever the count says "more"
        return max(size.rows, size.estimate)

    def _planned(self, account: Account, filters: OrderFilters) -> int:
        """The planner's row estimate for the export's rows (no rows are read)."""
        sql, params = for_psycopg(select(Order.id).where(*filter_conditions(account, filters)))
        plan = self._conn.execute(f"EXPLAIN (FORMAT JSON) {sql}", params).fetchone()
        return int(plan[0][0]["Plan"]["Plan Rows"]) if plan else 0

    def stream_into(
        self,
        account: Account,
        filters: OrderFilters,
        *,
        utf8_bom: bool,
        limit: int | None,
        sink: Callable[[CopyStream], None],
        compression: str = "none",
    ) -> CsvFile:
        """COPY the rows into ``sink``; with ``compression="gzip"`` the sink gets them gzipped."""
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}")
        statement, params = copy_statement(account, filters, limit=limit)
        prefix = (UTF8_BOM if utf8_bom else b"") + header_line(account.timezone)
        cursor = psycopg.ClientCursor(self._conn)
        kind = GzipCopyStream if compression == "gzip" else CopyStream
        # psycopg starts the COPY (and cancels and drains it if the sink fails); the rows are
        # read by copy_rows.
        with cursor.copy(statement, params):
            stream = self._stream = kind(
                chunks=copy_rows(self._conn), prefix=prefix, stopped=lambda: self.canceled
            )
            sink(stream)
        return CsvFile(row_count=stream.rows, size_bytes=stream.size, sha256=stream.sha256)

    def cancel(self) -> None:
        """Ask the server to cancel the running statement (thread-safe)."""
        with self._lock:
            self.canceled = True
            self._conn.cancel_safe()
