"""Running one client query on a key role's connection, streamed, under a time limit.

A query is first sent as it is with the extended protocol (one round trip), its rows
received in chunks and streamed (`StreamingCursor`). PostgreSQL refuses several statements
in one extended-protocol message while parsing, before anything runs; such a query is then
sent again with the simple protocol: the statements run as one implicit transaction and the
last result is answered (CARTO's rule), held in memory. A query with bind parameters
(`$1`, `$2`…: the simple protocol has none) must be one statement: several are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from grantkey.db.pg_wire import StreamingCursor
from grantkey.db.role_pools import RoleConnection

CANCEL_GRACE_SECONDS = 2.0
BATCH_ROWS = 2000


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int


class QueryTimedOut(Exception):
    """The server's time limit ended the query (not the client's own settings)."""


class SeveralStatementsWithParams(Exception):
    """Bind parameters go with one statement: PostgreSQL's simple protocol, which runs
    several, takes none (nothing ran)."""

    def __init__(self) -> None:
        super().__init__("A query with bind parameters must be a single statement")


def _columns(cursor: StreamingCursor) -> list[Column]:
    """Names, types and type modifiers (libpq's PQfmod, through psycopg's public PGresult:
    varchar's length, numeric's precision) of the result the cursor holds."""
    result = cursor.pgresult
    return [Column(c.name, c.type_code, result.fmod(i) if result is not None else -1)
            for i, c in enumerate(cursor.description or [])]


def _several_statements(error: psycopg.Error) -> bool:
    """PostgreSQL's refusal of a multi-statement query in an extended-protocol Parse.

    Told apart from a plain syntax error by where it was raised, not by the (translated)
    message."""
    return (isinstance(error, psycopg.errors.SyntaxError)
            and error.diag.source_function == "exec_parse_message")


class Execution:
    """One query in flight. `start()` runs it up to its first batch; then iterate `rows()`.

    `params`: bind parameters (`$1`, `$2`…), sent apart from the text in the extended
    protocol; the text is never scanned for placeholders."""

    def __init__(
        self, conn: RoleConnection, query: str, time_limit: float,
        terminate: Callable[[int], Awaitable[None]], params: Sequence[Any] | None = None,
    ) -> None:
        self.conn = conn
        self.query = query
        self.params = params
        self.time_limit = time_limit
        self._terminate = terminate
        self._cursor: StreamingCursor | None = None
        self._stream: AsyncGenerator[list[tuple[Any, ...]], None] | None = None
        self._batch: list[tuple[Any, ...]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.timed_out = False
        self.finished = False
        # called once the time limit has stopped the query, whatever the HTTP side does
        self.on_stopped: Callable[[], Awaitable[None]] | None = None
        self.columns: list[Column] = []
        self.rowcount = 0
        self._streamed = 0
        self._plain = False

    async def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.time_limit, self._on_time_limit)
        try:
            try:
                await self._start_streaming()
            except psycopg.Error as error:
                if not _several_statements(error):
                    raise
                if self.params is not None:
                    raise SeveralStatementsWithParams() from None
                await self._start_plain()
        except psycopg.errors.QueryCanceled:
            raise self._timeout_or_cancel() from None

    async def _start_streaming(self) -> None:
        self._cursor = StreamingCursor(self.conn)
        self._stream = self._cursor.batches(self.query, BATCH_ROWS, params=self.params,
                                            reset=True)
        await self._next_batch()
        self.columns = _columns(self._cursor)

    async def _next_batch(self) -> None:
        assert self._stream is not None and self._cursor is not None
        try:
            self._batch = await anext(self._stream)
        except StopAsyncIteration:
            self._batch = []
        if len(self._batch) < BATCH_ROWS:  # the last one: read the closing result too
            async for more in self._stream:
                self._batch.extend(more)
            self.finished = True
        self._streamed += len(self._batch)
        if self.finished:
            # after chunks of rows libpq's closing result has no command tag: count them
            self.rowcount = self._streamed or self._cursor.affected_rows

    @property
    def reset_done(self) -> bool:
        """The session was reset right after the query (DISCARD ALL pipelined behind it)
        and nothing ran since: it can go back to its pool as it is."""
        return (self.finished and not self._plain and self._cursor is not None
                and self._cursor.reset_done)

    async def _start_plain(self) -> None:
        self._plain = True  # runs after the streamed try's reset: the session is used again
        cursor = StreamingCursor(self.conn)  # refuses COPY like the streamed path
        await cursor.execute(self.query)
        while cursor.nextset():
            pass
        self.columns = _columns(cursor)
        self._batch = list(await cursor.fetchall()) if cursor.description else []
        self.rowcount = max(cursor.rowcount, 0)
        self.finished = True

    async def rows(self) -> AsyncIterator[tuple[Any, ...]]:
        while True:
            for row in self._batch:
                yield row
            self._batch = []
            if self.finished:
                return
            try:
                await self._next_batch()
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
        if self.on_stopped is not None:  # a client that stops reading cannot keep the slot
            await self.on_stopped()

    def stop_timers(self) -> None:
        """Cancel the time limit. The handles are dropped too: a cancelled uvloop timer keeps
        its callback (a bound method of this object), and that cycle would leave every
        request's execution, cursor and rows to the cyclic garbage collector."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()
            self._watchdog = None

    async def close(self) -> bool:
        """Stop the timer and any unfinished query; True if the connection may be reused."""
        if self._stream is not None and not self.finished:
            with contextlib.suppress(Exception):
                await self._stream.aclose()
        self.stop_timers()
        if self.conn.closed:
            return False
        if self.conn.info.transaction_status == TransactionStatus.ACTIVE:
            # interrupted mid-command (the client went away): stop it, never reuse the session
            with contextlib.suppress(psycopg.Error):
                await self.conn.cancel_safe(timeout=CANCEL_GRACE_SECONDS)
            return False
        return not self.timed_out
