"""Running one client query on a key role's connection, streamed, under a time limit.

A query is first declared as a server-side cursor (psycopg sends `DECLARE … CURSOR FOR
<query>` with the extended protocol): that succeeds only for a single SELECT or VALUES,
whose rows are then fetched in batches and streamed. Anything else — writes, DDL, several
statements — is refused by PostgreSQL at parse or analysis time, before it runs, and is
then sent as it is with the simple protocol: several statements run as one implicit
transaction and the last result is answered (CARTO's rule), held in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from grantkey.db.role_pools import RoleConnection

CANCEL_GRACE_SECONDS = 2.0
BATCH_ROWS = 2000
CURSOR_NAME = "grantkey_stream"


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int


class QueryTimedOut(Exception):
    """The server's time limit ended the query (not the client's own settings)."""


def _columns(description: list[psycopg.Column] | None) -> list[Column]:
    return [Column(c.name, c.type_code, int(getattr(c, "_fmod", -1))) for c in description or []]


def _fatal(error: psycopg.Error) -> bool:
    """Errors that end the attempt itself: a cancel, or the session going away."""
    return isinstance(error, psycopg.errors.QueryCanceled | psycopg.OperationalError)


class Execution:
    """One query in flight. `start()` runs it up to its first batch; then iterate `rows()`."""

    def __init__(
        self, conn: RoleConnection, query: str, time_limit: float,
        terminate: Callable[[int], Awaitable[None]],
    ) -> None:
        self.conn = conn
        self.query = query
        self.time_limit = time_limit
        self._terminate = terminate
        self._server: psycopg.AsyncServerCursor[tuple[Any, ...]] | None = None
        self._batch: list[tuple[Any, ...]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.timed_out = False
        self.finished = False
        self.columns: list[Column] = []
        self.rowcount = 0
        self._count_rows = False  # streamed rows are counted; a plain result knows its count

    async def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.time_limit, self._on_time_limit)
        try:
            if not await self._start_cursor():
                await self._start_plain()
        except psycopg.errors.QueryCanceled:
            raise self._timeout_or_cancel() from None

    async def _start_cursor(self) -> bool:
        await self.conn.execute("BEGIN")
        cursor = self.conn.cursor(name=CURSOR_NAME, scrollable=False)
        try:
            await cursor.execute(self.query)
        except psycopg.Error as error:
            if _fatal(error):
                raise
            await self.conn.execute("ROLLBACK")  # nothing ran: not a single SELECT, or invalid
            return False
        self._server = cursor
        self._count_rows = True
        self.columns = _columns(cursor.description)
        self._batch = list(await cursor.fetchmany(BATCH_ROWS))
        if len(self._batch) < BATCH_ROWS:
            await self._end_cursor()
        return True

    async def _end_cursor(self) -> None:
        assert self._server is not None
        await self._server.close()
        await self.conn.execute("COMMIT")
        self._server = None
        self.finished = True

    async def _start_plain(self) -> None:
        cursor = self.conn.cursor()
        await cursor.execute(self.query)
        while cursor.nextset():
            pass
        self.columns = _columns(cursor.description)
        self._batch = list(await cursor.fetchall()) if cursor.description else []
        self.rowcount = max(cursor.rowcount, 0)
        self.finished = True

    async def rows(self) -> AsyncIterator[tuple[Any, ...]]:
        while True:
            for row in self._batch:
                yield row
            if self._count_rows:
                self.rowcount += len(self._batch)
            self._batch = []
            if self._server is None:
                return
            try:
                self._batch = list(await self._server.fetchmany(BATCH_ROWS))
                if len(self._batch) < BATCH_ROWS:
                    await self._end_cursor()
            except psycopg.errors.QueryCanceled:
                raise self._timeout_or_cancel() from None

    def _timeout_or_cancel(self) -> BaseException:
        if self.timed_out:
            return QueryTimedOut()
        return psycopg.errors.QueryCanceled("canceling statement due to user request")

    def _on_time_limit(self) -> None:
        self.timed_out = True
        self._watchdog = asyncio.create_task(self._stop_from_outside())

    async def _stop_from_outside(self) -> None:
        """Cancel the query; if PostgreSQL has not stopped it soon after, end the session."""
        pid = self.conn.info.backend_pid
        with contextlib.suppress(psycopg.Error):
            await self.conn.cancel_safe(timeout=CANCEL_GRACE_SECONDS)
        await asyncio.sleep(CANCEL_GRACE_SECONDS)
        if not self.finished and not self.conn.closed:
            await self._terminate(pid)

    async def close(self) -> bool:
        """Stop the timer and any unfinished query; True if the connection may be reused."""
        if self._timer is not None:
            self._timer.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.conn.closed:
            return False
        if self.conn.info.transaction_status == TransactionStatus.ACTIVE:
            # interrupted mid-command (the client went away): stop it, never reuse the session
            with contextlib.suppress(psycopg.Error):
                await self.conn.cancel_safe(timeout=CANCEL_GRACE_SECONDS)
            return False
        return not self.timed_out
