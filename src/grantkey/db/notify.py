"""NOTIFY in a transaction; LISTEN on a channel of the metadata database, on a connection
of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from psycopg import sql

from grantkey.db.cluster import AdminConnection
from grantkey.errors import DatabaseUnavailable


async def notify(meta: AdminConnection, channel: str, payload: str, *,
                 stamped: bool = False) -> None:
    """Delivered when (and only if) the transaction commits. `stamped`: the payload gets
    `:<PostgreSQL's clock now, epoch seconds>` (sessions that started later are not the
    ones the change was about: see `sessions.terminate_role_sessions`)."""
    if stamped:
        cur = await meta.execute(
            "SELECT pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) AS now")
        row = await cur.fetchone()
        assert row is not None
        payload = f"{payload}:{float(row['now'])!r}"
    await meta.execute("SELECT pg_catalog.pg_notify(%s, %s)", [channel, payload])


@asynccontextmanager
async def listening(conninfo: str, channel: str) -> AsyncIterator[AsyncIterator[str]]:
    """Yields the channel's payloads as they come (LISTEN is in place on entry); any
    failure of the connection, on entry or while waiting, is DatabaseUnavailable."""
    try:
        conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        async with conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            yield _payloads(conn)
    except psycopg.Error as error:
        raise DatabaseUnavailable(f"lost the LISTEN connection: {type(error).__name__}") from error


async def _payloads(conn: psycopg.AsyncConnection[object]) -> AsyncIterator[str]:
    try:
        async for notice in conn.notifies():
            yield notice.payload
    except psycopg.Error as error:
        raise DatabaseUnavailable(f"lost the LISTEN connection: {type(error).__name__}") from error
