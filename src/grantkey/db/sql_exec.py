"""Running one client query on a key role's connection, streamed, under a time limit.

A single statement is streamed row by row (psycopg's single-row mode, extended protocol).
PostgreSQL refuses several statements in one extended-protocol query at parse time,
before anything runs; such a query is then sent again with the simple protocol, which
runs all statements as one implicit transaction and returns every result, of which the
last is answered (CARTO's rule). That last result is held in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from grantkey.db.role_pools import RoleConnection

MULTI_STATEMENT = "cannot insert multiple commands into a prepared statement"
CANCEL_GRACE_SECONDS = 2.0


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int


class QueryTimedOut(Exception):
    """The server's time limit ended the query (not the client's own settings)."""


class Execution:
    """One query in flight. `start()` runs it up to its first row; then iterate `rows()`."""

    def __init__(
        self, conn: RoleConnection, query: str, time_limit: float,
        terminate: Callable[[int], Awaitable[None]],
    ) -> None:
        self.conn = conn
        self.query = query
        self.time_limit = time_limit
        self._terminate = terminate
        self._cursor = conn.cursor()
        self._stream: AsyncIterator[tuple[Any, ...]] | None = None
        self._first: tuple[Any, ...] | None = None
        self._buffered: list[tuple[Any, ...]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.timed_out = False
        self.finished = False
        self.columns: list[Column] = []
        self.rowcount = 0

    async def start(self) -> None:
        self._arm_timer()
        try:
            await self._start()
        except psycopg.errors.QueryCanceled:
            raise self._timeout_or(None) from None

    async def _start(self) -> None:
        stream = self._cursor.stream(self.query)
        try:
            self._first = await anext(stream)
        except StopAsyncIteration:
            self._finish()
            return
        except psycopg.errors.SyntaxError as error:
            if MULTI_STATEMENT not in str(error):
                raise
            await self._start_multi_statement()
            return
        self._stream = stream
        self._describe()

    async def _start_multi_statement(self) -> None:
        await self._cursor.execute(self.query)
        while self._cursor.nextset():
            pass
        self._buffered = list(await self._cursor.fetchall()) if self._cursor.description else []
        self._finish()

    def _describe(self) -> None:
        description = self._cursor.description or []
        self.columns = [Column(c.name, c.type_code, _modifier(c)) for c in description]

    def _finish(self) -> None:
        self._describe()
        self.rowcount = max(self._cursor.rowcount, 0)
        self.finished = True

    async def rows(self) -> AsyncIterator[tuple[Any, ...]]:
        if self._buffered is not None:
            for row in self._buffered:
                yield row
            return
        if self._first is not None:
            yield self._first
            self._first = None
        if self._stream is None:
            return
        count = 1
        try:
            async for row in self._stream:
                count += 1
                yield row
        except psycopg.errors.QueryCanceled:
            raise self._timeout_or(None) from None
        self.rowcount = count
        self.finished = True

    def _timeout_or(self, error: BaseException | None) -> BaseException:
        if self.timed_out:
            return QueryTimedOut()
        return error or psycopg.errors.QueryCanceled("canceling statement due to user request")

    def _arm_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.time_limit, self._on_time_limit)

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
        """Stop the timer; True if the connection may be reused."""
        if self._timer is not None:
            self._timer.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        reusable = self.finished and not self.timed_out and not self.conn.closed
        if not reusable and not self.conn.closed:
            with contextlib.suppress(psycopg.Error):
                await self.conn.cancel_safe(timeout=CANCEL_GRACE_SECONDS)
        with contextlib.suppress(psycopg.Error):
            await self._cursor.close()
        return reusable


def _modifier(column: Any) -> int:
    """The column's type modifier (PostGIS encodes geometry type and SRID there)."""
    return int(getattr(column, "_fmod", -1))
