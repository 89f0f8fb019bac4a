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

from collections.abc import AsyncGenerator
from typing import Any

import psycopg
from psycopg import pq
from psycopg.generators import fetch, fetch_many, send
from psycopg.pq.abc import PGresult

Row = tuple[Any, ...]
_STATUS = pq.ExecStatus


def chunked_rows_available() -> bool:
    """Chunks of many rows need libpq 17; older ones stream row by row."""
    return pq.version() >= 170000


class StreamingCursor(psycopg.AsyncCursor[Row]):
    """`batches()` yields lists of rows; afterwards `final` holds the closing result."""

    final: PGresult | None = None

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
            while res is not None:  # up to the end of this statement's results
                res = yield from fetch(self._pgconn)
            return None
        error = res
        while res is not None:  # read up to ReadyForQuery: the connection stays usable
            res = yield from fetch(self._pgconn)
        return self._raise_for_result(error)

    async def batches(self, query: str, size: int) -> AsyncGenerator[list[Row], None]:
        """Run `query` (one statement only: the extended protocol refuses several)."""
        chunk = size if chunked_rows_available() else 1
        async with self._conn.lock:
            await self._conn.wait(self._stream_send_gen(query, None, size=chunk))
            first = True
            batch: list[Row] = []
            while res := await self._conn.wait(self._stream_fetchone_gen(first)):
                batch.extend(self._tx.load_rows(0, res.ntuples, self._make_row))
                first = False
                if len(batch) >= size:
                    yield batch
                    batch = []
            if self.final is not None and self.final.status == _STATUS.TUPLES_OK:
                self.pgresult = self.final  # an empty result still has its columns
                self._tx.set_pgresult(self.final, set_loaders=first)
            if batch:
                yield batch

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
