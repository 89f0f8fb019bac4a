"""What we do below psycopg's public API, in one place: streaming one statement, and
resetting a pooled session without waiting for the answer.

One statement is sent with the extended protocol, its rows received in chunks. psycopg's
`AsyncCursor.stream()` does this but refuses statements that return no rows (writes, DDL)
after they ran, and forgets the final result, so a write's row count and an empty
result's columns are lost. `StreamingCursor` keeps that final result. It leans on
psycopg's stream generators (private API): psycopg's minor version is pinned
(pyproject.toml) and `tests/db/test_pg_wire.py` checks the behaviour we rely on.
"""

from __future__ import annotations

import ctypes
import functools
import select
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from typing import Any, NoReturn

import psycopg
from psycopg import pq
from psycopg.generators import fetch, fetch_many, send
from psycopg.pq.abc import PGresult

from grantkey.domain.sql_text import COPY_REFUSED

Row = tuple[Any, ...]
_STATUS = pq.ExecStatus
_COPY = frozenset({_STATUS.COPY_IN, _STATUS.COPY_OUT, _STATUS.COPY_BOTH})


@functools.cache
def _libpq_send_pipeline_sync() -> Callable[[int], int] | None:
    """libpq 17's PQsendPipelineSync (a Sync queued without sending), from the libpq psycopg
    loaded; None with an older libpq or where it cannot be found (Linux maps only)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libpq" in line and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        function = getattr(ctypes.CDLL(path), "PQsendPipelineSync", None)
        if function is not None:
            function.argtypes = [ctypes.c_void_p]
            function.restype = ctypes.c_int
            return function  # type: ignore[no-any-return]
    return None


def queue_pipeline_sync(pgconn: pq.abc.PGconn) -> None:
    """A Sync left in libpq's buffer for the next flush (libpq 17+), so that a query and
    what follows it leave in one send; with an older libpq, a sync that flushes."""
    function = _libpq_send_pipeline_sync()
    pointer = getattr(pgconn, "pgconn_ptr", None)  # every implementation has it; abc not
    if function is None or pointer is None:
        pgconn.pipeline_sync()
    elif function(pointer) != 1:
        raise psycopg.OperationalError(f"failed to queue a pipeline sync: {pgconn.error_message!r}")


class CopyRefused(Exception):
    """A statement started a COPY to or from the client; the session was closed under it.

    libpq answers every further read of a session in copy mode with the same copy result,
    so a loop that waits for the end of the results would spin forever without yielding.
    Closing the session is the one exit that works for every direction. The SQL API
    refuses COPY before sending it (`domain.sql_text`); this is the backstop."""

    def __init__(self) -> None:
        super().__init__(COPY_REFUSED)


def chunked_rows_available() -> bool:
    """Chunks of many rows need libpq 17; older ones stream row by row."""
    return pq.version() >= 170000


class StreamingCursor(psycopg.AsyncRawCursor[Row]):
    """`batches()` yields lists of rows; afterwards `final` holds the closing result, and
    `reset_done` says whether the session's DISCARD ALL, sent with the query, succeeded.

    A raw cursor: bind parameters are PostgreSQL's own `$1`, `$2`…, and the query text is
    never scanned for psycopg's `%s` (a client's `LIKE 'a%'` stays as it is)."""

    final: PGresult | None = None
    reset_done = False

    def _raise_for_result(self, result: PGresult) -> NoReturn:
        """psycopg's check of each result, with COPY refused (plain `execute()` too)."""
        if result.status in _COPY:
            self._pgconn.finish()
            raise CopyRefused()
        super()._raise_for_result(result)

    def _rest_of_statement(self, res: PGresult | None) -> Generator[Any, Any, PGresult | None]:
        """Read up to the end of this statement's results (ReadyForQuery); the first error
        among them, if any (a deferred constraint failing at the implicit commit comes
        after the statement's own result)."""
        error = None
        while res is not None:
            if res.status in _COPY:
                self._raise_for_result(res)
            if res.status == _STATUS.FATAL_ERROR and error is None:
                error = res
            res = yield from fetch(self._pgconn)
        return error

    def _stream_fetchone_gen(self, first: bool) -> Any:
        res: PGresult | None = yield from fetch(self._pgconn)
        if res is None:
            return None
        status = res.status
        if status in (_STATUS.SINGLE_TUPLE, _STATUS.TUPLES_CHUNK):
            self.pgresult = res
            self._tx.set_pgresult(res, set_loaders=first)
            if first:
                self._make_row = self._make_row_maker()
            return res
        if status in (_STATUS.TUPLES_OK, _STATUS.COMMAND_OK):
            self.final = res
            failed = yield from self._rest_of_statement(res)
            if failed is not None:  # the statement ran, its commit did not
                self._raise_for_result(failed)
            return None
        if status in _COPY:
            self._raise_for_result(res)
        yield from self._rest_of_statement(res)  # the connection stays usable after an error
        self._raise_for_result(res)

    async def batches(self, query: str, size: int, *, params: Sequence[Any] | None = None,
                      reset: bool = False) -> AsyncGenerator[list[Row], None]:
        """Run `query` (one statement only: the extended protocol refuses several), with
        `params` as its bind parameters (`$1`, `$2`…) if given. With
        `reset`, DISCARD ALL goes out in the same write, pipelined behind the query: the
        session is reset as soon as the query ends, with no round trip or wake-up of its
        own (read back here; `reset_done`)."""
        chunk = size if chunked_rows_available() else 1
        async with self._conn.lock:
            if reset:
                await self._conn.wait(self._send_then_reset_gen(query, params, chunk))
            else:
                await self._conn.wait(self._stream_send_gen(query, params, size=chunk))
            first = True
            batch: list[Row] = []
            try:
                while res := await self._conn.wait(self._stream_fetchone_gen(first)):
                    batch.extend(self._tx.load_rows(0, res.ntuples, self._make_row))
                    first = False
                    if len(batch) >= size:
                        yield batch
                        batch = []
            except psycopg.Error:
                if reset:  # the statement ended in an error: the reset still ran after it
                    self.reset_done, _ = await self._conn.wait(self._reset_answer_gen())
                raise
            if reset:
                self.reset_done, failed = await self._conn.wait(self._reset_answer_gen())
                if failed is not None:  # the statement ran, its commit did not
                    self._raise_for_result(failed)
            if self.final is not None and self.final.status == _STATUS.TUPLES_OK:
                self.pgresult = self.final  # an empty result still has its columns
                self._tx.set_pgresult(self.final, set_loaders=first)
            if batch:
                yield batch

    def _send_then_reset_gen(self, query: str, params: Sequence[Any] | None,
                             size: int) -> Generator[Any, Any, None]:
        """psycopg's `_stream_send_gen` in libpq's pipeline mode, with a sync after the
        query (its own implicit transaction, as without the pipeline) and DISCARD ALL
        behind it (its own too: DISCARD ALL cannot run in a transaction block)."""
        yield from self._start_query(query)
        pgq = self._convert_query(query, params)
        self._pgconn.enter_pipeline_mode()
        self._execute_send(pgq, force_extended=True)
        if size == 1:
            self._pgconn.set_single_row_mode()
        else:
            self._pgconn.set_chunked_rows_mode(size)
        queue_pipeline_sync(self._pgconn)  # the query and its reset leave in one send
        self._pgconn.send_query_params(RESET, None)
        self._pgconn.pipeline_sync()
        self._last_query = query
        yield from send(self._pgconn)

    def _reset_answer_gen(self) -> Generator[Any, Any, tuple[bool, PGresult | None]]:
        """After the query's results: its sync (an error before it is the query's commit
        failing), the DISCARD ALL's result and sync; leave pipeline mode. (True if the
        reset succeeded and the session is idle, the commit's error if any.)"""
        ok, syncs, failed = True, 0, None
        while syncs < 2:
            res = yield from fetch(self._pgconn)
            if res is None:
                continue
            if res.status == _STATUS.PIPELINE_SYNC:
                syncs += 1
            elif res.status in _COPY:  # cannot happen behind a sync; never spin
                self._raise_for_result(res)
            elif syncs == 0:
                failed = failed or (res if res.status == _STATUS.FATAL_ERROR else None)
            elif res.status != _STATUS.COMMAND_OK:
                ok = False
        self._pgconn.exit_pipeline_mode()
        return ok and self._pgconn.transaction_status == pq.TransactionStatus.IDLE, failed

    @property
    def affected_rows(self) -> int:
        if self.final is None:
            return 0
        return self.final.command_tuples or 0


RESET = b"DISCARD ALL"


async def send_reset(conn: psycopg.AsyncConnection[Row]) -> None:
    """Send DISCARD ALL without waiting for its answer; `finish_reset` reads it."""
    async with conn.lock:
        conn.pgconn.send_query(RESET)
        await conn.wait(send(conn.pgconn))


def send_reset_at_once(conn: psycopg.AsyncConnection[Row]) -> bool:
    """Send DISCARD ALL without suspending the caller, when nothing else uses the connection
    and the message fits the socket at once; False if it was not sent."""
    if conn.closed or conn.lock.locked():
        return False
    conn.pgconn.send_query(RESET)
    if conn.pgconn.flush() != 0:  # partly sent: the connection is not fit for reuse
        conn.pgconn.finish()
        return False
    return True


async def finish_reset(conn: psycopg.AsyncConnection[Row]) -> bool:
    """Read the answer of `send_reset`; False if the connection is not fit for reuse."""
    if conn.closed:
        return False
    try:
        async with conn.lock:
            results = await conn.wait(fetch_many(conn.pgconn))
    except psycopg.Error:
        return False
    return (bool(results) and all(r.status == _STATUS.COMMAND_OK for r in results)
            and conn.info.transaction_status == pq.TransactionStatus.IDLE)


def still_connected(conn: psycopg.AsyncConnection[Row]) -> bool:
    """False if the server closed an idle session (a restart, `pg_terminate_backend`): its
    farewell (an error, then the end of the stream) is already waiting. A reset session
    has nothing to say, so any input at all means it is not fit. No round trip: one poll
    of the socket (select() cannot watch descriptors past 1,024), no read."""
    if conn.closed or conn.pgconn.status != pq.ConnStatus.OK:
        return False
    poller = select.poll()
    poller.register(conn.pgconn.socket, select.POLLIN)
    if poller.poll(0):
        return False
    return not conn.pgconn.is_busy() and conn.pgconn.get_result() is None
