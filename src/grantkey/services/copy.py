"""COPY use cases (carto-compat.md §9): a client's COPY … FROM STDIN fed with its upload,
a COPY … TO STDOUT streamed back, both logged in as the key's role (`SqlService.session`:
its pools, shares, storage quota and revocation handling) under the COPY time limit.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from dataclasses import dataclass
from types import TracebackType

from grantkey.db.copy import (
    Deadline,
    WrongDirection,
    copy_in,
    copy_out,
    create_statement,
    export_statement,
    load_statement,
)
from grantkey.db.copy import Tally as Tally  # what a finished export reports (the CLI's)
from grantkey.domain.keys import Principal
from grantkey.errors import BadInput, SqlError
from grantkey.services.resolver import usable
from grantkey.services.sql import SqlService, run_shielded

QUOTA_CHECK_BYTES = 4 * 2**20
QUOTA_MESSAGE = "DB Quota exceeded"
WRONG_WAY = {
    "copyfrom": "copyfrom runs COPY … FROM STDIN (COPY … TO STDOUT goes to /api/v2/sql/copyto)",
    "copyto": "copyto runs COPY … TO STDOUT (COPY … FROM STDIN goes to /api/v2/sql/copyfrom)",
}


@dataclass(frozen=True)
class Copied:
    rows: int
    seconds: float


class RunningCopy:
    """A started COPY TO: `blocks()` streams its data; it owns its session until `aclose()`
    (or leaving `async with`), which ends a COPY still running."""

    def __init__(self, stack: contextlib.AsyncExitStack, blocks: AsyncGenerator[bytes, None],
                 first: bytes) -> None:
        self._stack = stack
        self._blocks = blocks
        self._first = first
        self.released = False

    async def blocks(self) -> AsyncIterator[bytes]:
        if self._first:
            yield self._first
        async for block in self._blocks:
            yield block

    async def __aenter__(self) -> RunningCopy:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End the COPY (if still running) and give the session back, once, even while
        the caller is being cancelled (the client went away)."""
        if self.released:
            return
        self.released = True
        await run_shielded(self._close())

    async def _close(self) -> None:
        try:
            await self._blocks.aclose()
        finally:
            await self._stack.aclose()


class CopyService:
    def __init__(self, sql: SqlService, *, time_limit: float, start_limit: float) -> None:
        self.sql = sql
        self.time_limit = time_limit
        self.start_limit = start_limit  # the SQL API's: until PostgreSQL waits for the data

    async def copy_from(self, principal: Principal, statement: str,
                        source: AsyncIterable[bytes], *, first: str | None = None) -> Copied:
        """Run the client's COPY … FROM STDIN with `source`; all its rows or none. Until
        PostgreSQL waits for the data (a lock, a slow COPY the other way) the SQL API's time
        limit applies, then the COPY's. With a storage quota the database is measured every
        QUOTA_CHECK_BYTES of data: over it, the COPY ends (400 `DB Quota exceeded`).
        `first`: a statement run before it in the same transaction (the CLI's CREATE
        TABLE: nothing of it stays if the COPY fails)."""
        started = time.monotonic()
        user = principal.user
        if user.storage_quota != "-1":
            source = self._within_quota(user.database, source)
        limit = self.sql.until_stop(principal, self.time_limit)  # its token may stop sooner
        async with self._stop_said(principal), self.sql.session(principal) as conn:
            with Deadline(conn, limit, self.sql.terminate, cancel_task=True), \
                    Deadline(conn, self.start_limit, self.sql.terminate,
                             cancel_task=True) as starting:
                try:
                    rows = await copy_in(conn, statement, source, first=first,
                                         started=starting.disarm)
                except WrongDirection as error:
                    raise BadInput(WRONG_WAY[error.endpoint]) from None
        return Copied(rows, round(time.monotonic() - started, 3))

    async def _within_quota(self, database: str,
                            source: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        written, measure_at = 0, QUOTA_CHECK_BYTES
        async for block in source:
            written += len(block)
            if written >= measure_at:
                measure_at = written + QUOTA_CHECK_BYTES
                over = await self.sql.over_quota(database)
                if over is not None:
                    raise SqlError(400, QUOTA_MESSAGE, hint=over)
            yield block

    @contextlib.asynccontextmanager
    async def _stop_said(self, principal: Principal) -> AsyncIterator[None]:
        try:
            yield
        except SqlError as error:
            _stopped(principal, error)
            raise

    async def copy_to(self, principal: Principal, statement: str,
                      tally: Tally | None = None) -> RunningCopy:
        """Start the client's COPY … TO STDOUT, up to its first data (or its end): errors
        until then have a status. Once its blocks are all read, `tally` has its rows."""
        stack = contextlib.AsyncExitStack()
        conn = await stack.enter_async_context(self.sql.session(principal))
        limit = self.sql.until_stop(principal, self.time_limit)  # its token may stop sooner
        stack.enter_context(Deadline(conn, limit, self.sql.terminate, cancel_task=False))
        blocks = copy_out(conn, statement, tally)
        try:
            try:
                first = await anext(blocks, b"")
            except WrongDirection as error:
                raise BadInput(WRONG_WAY[error.endpoint]) from None
        except BaseException as error:
            await blocks.aclose()
            try:
                suppressed = await stack.__aexit__(*sys.exc_info())
            except SqlError as translated:  # the session's translation of the failure
                _stopped(principal, translated)
                raise
            if not suppressed:
                _stopped(principal, error)
                raise
            raise AssertionError("unreachable") from None
        return RunningCopy(stack, blocks, first)

    async def load(self, principal: Principal, schema: str, table: str, columns: list[str],
                   source: AsyncIterable[bytes], *, header: bool, delimiter: str = ",",
                   create: list[tuple[str, str]] | None = None) -> Copied:
        """CSV into named columns of a table (the CLI's load), made first with `create`'s
        columns and types (`domain.loading`) in the same transaction."""
        statement = load_statement(schema, table, columns, header=header, delimiter=delimiter)
        first = None if create is None else create_statement(schema, table, create)
        return await self.copy_from(principal, statement, source, first=first)

    async def export(self, principal: Principal, *, query: str | None = None,
                     table: tuple[str, str] | None = None,
                     tally: Tally | None = None) -> RunningCopy:
        """A query's rows or a table as CSV with a header (the CLI's export)."""
        return await self.copy_to(principal, export_statement(query=query, table=table), tally)


def _stopped(principal: Principal, error: BaseException) -> None:
    """A COPY cut at the moment its token stopped working (its key's expiry, an old
    token's grace) answers as that token now would: 401, not the time limit's 429."""
    if isinstance(error, SqlError) and error.status == 429 and principal.stop_time is not None:
        usable(principal)
