"""COPY to and from the client on a key role's session: the client's statement sent as it
is, with the extended protocol (one statement: PostgreSQL refuses a second one before
anything runs), its data streamed both ways.

psycopg's `AsyncCursor.copy()` sends a statement without parameters with the simple
protocol, where `COPY t FROM STDIN; DELETE FROM t` would run both: `CopyCursor` sends it
with the extended protocol instead. A COPY that is not the one the endpoint expects (TO
STDOUT sent to copyfrom) is ended at once (`WrongDirection`).

COPY FROM: the data goes in as it comes; an error from the source (the client went away,
its gzip is broken, the size limit) ends the COPY with CopyFail, so PostgreSQL rolls the
statement back: nothing of it is written. COPY TO: PostgreSQL's rows are gathered into
blocks of up to `BLOCK_BYTES` (one libpq read gives one row) without waiting for more than
is already there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.abc import Query
from psycopg.generators import execute, fetch_many
from psycopg.waiting import Wait

from grantkey.db.role_pools import RoleConnection
from grantkey.db.sql_exec import CANCEL_GRACE_SECONDS, QueryTimedOut
from grantkey.domain.loading import GEOMETRY_TYPE, TYPES

BLOCK_BYTES = 256 * 1024
LARGE_ROW_BYTES = 16 * 2**20  # a session that received a row this long is closed, not pooled
_STATUS = pq.ExecStatus


class WrongDirection(Exception):
    """The statement copies the other way: `endpoint` is the one that ran it (copyfrom,
    copyto)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        super().__init__(endpoint)


class CopyCursor(psycopg.AsyncRawCursor[tuple[Any, ...]]):
    """psycopg's cursor, its COPY sent with the extended protocol."""

    def _start_copy_gen(self, statement: Query, params: Any = None) -> Generator[Any, Any, None]:
        yield from self._start_query()
        query = self._convert_query(statement)
        self._execute_send(query, force_extended=True, binary=False)
        results = yield from execute(self._pgconn)
        if len(results) != 1:
            raise psycopg.ProgrammingError("COPY cannot be mixed with other operations")
        self._check_copy_result(results[0])
        self._set_results(results)


class Deadline:
    """The time limit of a COPY, enforced from outside: at `seconds` the backend's
    statement is cancelled, and with `cancel_task` the task that entered the deadline too
    (a COPY FROM waiting for its client then ends with CopyFail); a backend still busy
    `CANCEL_GRACE_SECONDS` later is terminated (`terminate`: an admin connection's
    pg_terminate_backend). Leaving it with PostgreSQL's error or the cancellation it caused
    raises QueryTimedOut."""

    def __init__(self, conn: RoleConnection, seconds: float,
                 terminate: Callable[[int], Awaitable[None]], *, cancel_task: bool) -> None:
        self.conn = conn
        self.seconds = seconds
        self.terminate = terminate
        self.cancel_task = cancel_task
        self.expired = False
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.Task[None] | None = None

    def __enter__(self) -> Deadline:
        self._task = asyncio.current_task() if self.cancel_task else None
        self._timer = asyncio.get_running_loop().call_later(self.seconds, self._expire)
        return self

    def disarm(self) -> None:
        """No limit any more (it expired or not: leaving still says which)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: object) -> None:
        self.disarm()
        if self.expired and isinstance(error, asyncio.CancelledError | psycopg.Error):
            if self._task is not None:
                self._task.uncancel()
            raise QueryTimedOut() from None

    def _expire(self) -> None:
        self.expired = True
        self._watchdog = asyncio.create_task(self._stop())
        if self._task is not None:
            self._task.cancel()

    async def _stop(self) -> None:
        pid = self.conn.info.backend_pid
        with contextlib.suppress(psycopg.Error):
            await self.conn.cancel_safe(timeout=CANCEL_GRACE_SECONDS)
        await asyncio.sleep(CANCEL_GRACE_SECONDS)
        if not self.conn.closed and self.conn.info.transaction_status == pq.TransactionStatus.ACTIVE:
            await self.terminate(pid)


def _status(cursor: CopyCursor) -> int | None:
    return None if cursor.pgresult is None else cursor.pgresult.status


async def copy_in(conn: RoleConnection, statement: str, source: AsyncIterable[bytes], *,
                  first: str | None = None, started: Callable[[], None] | None = None) -> int:
    """Run a COPY … FROM STDIN with `source`'s bytes; the rows written. An exception from
    `source` aborts the COPY (nothing written) and is raised as it is. `first` (a CREATE
    TABLE) runs before it, in one transaction with it; `started` is called once PostgreSQL
    waits for the data. A session PostgreSQL ended meanwhile (a revoked key's) is noticed
    after the next block, not at the end of the upload."""
    if first is None:
        return await _copy_in(conn, statement, source, started)
    async with conn.transaction():
        await CopyCursor(conn).execute(first)
        return await _copy_in(conn, statement, source, started)


async def _copy_in(conn: RoleConnection, statement: str, source: AsyncIterable[bytes],
                   started: Callable[[], None] | None) -> int:
    cursor = CopyCursor(conn)
    async with cursor.copy(statement) as copy:
        if _status(cursor) != _STATUS.COPY_IN:
            raise WrongDirection("copyfrom")
        if started is not None:
            started()
        async for block in source:
            if block:
                await copy.write(block)
                # libpq reports a failed write only once its buffer fills: read what came
                # (an ended session's farewell, its end) without waiting
                conn.pgconn.consume_input()
    return max(cursor.rowcount, 0)


def _gather(pgconn: pq.abc.PGconn) -> Generator[Any, Any, tuple[bytes, int | None]]:
    """The copy data already received, up to about BLOCK_BYTES, waiting only when there
    is none; (data, rows copied) at the end of the copy, (data, None) before it (its final
    result read as psycopg's `copy_from` generator does, without returning after each
    row)."""
    block = bytearray()
    while True:
        size, data = pgconn.get_copy_data(1)
        if size >= BLOCK_BYTES and not block:
            return bytes(data), None  # a long row: one copy, not three
        if size > 0:
            block += data
            if len(block) >= BLOCK_BYTES:
                return bytes(block), None
        elif size == 0:  # nothing more for now
            if block:
                return bytes(block), None
            while not (yield Wait.R):
                pass
            pgconn.consume_input()
        else:
            break
    rows = 0
    for result in (yield from fetch_many(pgconn)):
        if result.status != _STATUS.COMMAND_OK:
            raise psycopg.errors.error_from_result(
                result, encoding=getattr(pgconn, "_encoding", "utf-8"))
        rows += result.command_tuples or 0
    return bytes(block), rows


@dataclass
class Tally:
    """What a finished COPY TO reports: the rows it copied."""

    rows: int = 0


async def copy_out(conn: RoleConnection, statement: str,
                   tally: Tally | None = None) -> AsyncGenerator[bytes, None]:
    """Run a COPY … TO STDOUT; its data in blocks as PostgreSQL sends it (never an empty
    one); at its end `tally` has the row count. Closing the generator early cancels the
    COPY and reads its rest (psycopg's way)."""
    cursor = CopyCursor(conn)
    async with cursor.copy(statement):
        if _status(cursor) != _STATUS.COPY_OUT:
            raise WrongDirection("copyto")
        rows = None
        longest = 0
        while rows is None:
            block, rows = await conn.wait(_gather(conn.pgconn))
            longest = max(longest, len(block))
            if block:
                yield block
        if tally is not None:
            tally.rows = rows
    if longest > LARGE_ROW_BYTES:  # libpq's input buffer grew to hold it, and stays so
        await conn.close()


def load_statement(schema: str, table: str, columns: Sequence[str], *, header: bool,
                   delimiter: str = ",") -> str:
    """`grantkey data load`'s COPY of CSV into named columns."""
    return sql.SQL("COPY {}.{} ({}) FROM STDIN WITH (FORMAT csv, HEADER {}, DELIMITER {})").format(
        sql.Identifier(schema), sql.Identifier(table),
        sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        sql.SQL("true" if header else "false"), sql.Literal(delimiter)).as_string(None)


def create_statement(schema: str, table: str, columns: Sequence[tuple[str, str]]) -> str:
    """CREATE TABLE with the columns' types, each from `loading.TYPES` or the geometry."""
    for _, kind in columns:
        if kind not in TYPES and kind != GEOMETRY_TYPE:
            raise ValueError(f"not a type loading makes: {kind}")
    return sql.SQL("CREATE TABLE {}.{} ({})").format(
        sql.Identifier(schema), sql.Identifier(table),
        sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind))
                           for name, kind in columns)).as_string(None)


def export_statement(*, query: str | None = None,
                     table: tuple[str, str] | None = None) -> str:
    """`grantkey data export`'s COPY … TO STDOUT as CSV with a header: of a query (wrapped,
    never edited) or of a table."""
    source: sql.Composable
    if query is not None:
        source = sql.SQL("(\n{}\n)").format(sql.SQL(query))
    elif table is not None:
        source = sql.SQL("{}.{}").format(sql.Identifier(table[0]), sql.Identifier(table[1]))
    else:
        raise ValueError("a query or a table")
    return sql.SQL("COPY {} TO STDOUT WITH (FORMAT csv, HEADER true)").format(
        source).as_string(None)
