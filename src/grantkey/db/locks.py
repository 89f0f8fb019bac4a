"""Advisory locks grantkey holds across processes: one per user while it is provisioned
(start-up repair leaves that user alone), one while user databases are migrated."""

from __future__ import annotations

from typing import Any

import psycopg

USER_LOCK_CLASS = 0x676B  # "gk": the first key of the advisory lock held while provisioning
Conn = psycopg.AsyncConnection[Any]


async def hold_user_lock(conn: Conn, user_id: str) -> None:
    """Until `conn`'s session ends (it is an autocommit session of its own)."""
    await conn.execute("SELECT pg_catalog.pg_advisory_lock(%s, pg_catalog.hashtext(%s::text))",
                       [USER_LOCK_CLASS, user_id])


async def user_lock_free(conn: Conn, user_id: str) -> bool:
    """Take the user's lock if nobody holds it (its creator is no longer at work)."""
    cur = await conn.execute(
        "SELECT pg_catalog.pg_try_advisory_lock(%s, pg_catalog.hashtext(%s::text))",
        [USER_LOCK_CLASS, user_id])
    row = await cur.fetchone()
    return row is not None and bool(_first(row))


async def lock(conn: Conn, key: tuple[int, int]) -> None:
    await conn.execute("SELECT pg_catalog.pg_advisory_lock(%s, %s)", list(key))


async def unlock(conn: Conn, key: tuple[int, int]) -> None:
    await conn.execute("SELECT pg_catalog.pg_advisory_unlock(%s, %s)", list(key))


def _first(row: Any) -> Any:
    return next(iter(row.values())) if isinstance(row, dict) else row[0]
