"""The one way grantkey ends PostgreSQL sessions, and what it asks the catalog about a
session's answer. Admin connections only (the metadata database sees every backend)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

Conn = psycopg.AsyncConnection[Any]


async def terminate_backend(conn: Conn, pid: int) -> None:
    """One backend (a query past its time limit that ignored the cancel)."""
    await conn.execute("SELECT pg_catalog.pg_terminate_backend(%s)", [pid])


async def backend_start(conn: Conn, pid: int) -> datetime | None:
    """When a backend started (with its pid, what names one session and no later one)."""
    cur = await conn.execute(
        "SELECT backend_start FROM pg_catalog.pg_stat_activity WHERE pid OPERATOR(pg_catalog.=) %s",
        [pid])
    row = await cur.fetchone()
    if row is None:
        return None
    started: datetime = row["backend_start"] if isinstance(row, dict) else row[0]
    return started


async def stop_session(conn: Conn, pid: int, started: datetime, *, terminate: bool) -> bool:
    """Cancel the statement of (or end) the session `pid` if it is still the one that
    started at `started`; whether there was one to signal."""
    function = "pg_terminate_backend" if terminate else "pg_cancel_backend"
    cur = await conn.execute(
        f"SELECT pg_catalog.{function}(pid) AS signalled FROM pg_catalog.pg_stat_activity "
        "WHERE pid OPERATOR(pg_catalog.=) %s AND backend_start OPERATOR(pg_catalog.=) %s",
        [pid, started])
    return await cur.fetchone() is not None


async def terminate_role_sessions(conn: Conn, oids: list[int],
                                  started_before: float | None = None) -> None:
    """Every session of these roles, by OID: once a role is dropped, pg_stat_activity no
    longer shows its name. `started_before` (epoch seconds, PostgreSQL's clock): only the
    sessions that logged in before it (a regenerated key's role logs in again with the new
    token, and those sessions must live)."""
    await conn.execute(
        "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity "
        "WHERE usesysid = ANY(%(oids)s::oid[]) AND (%(before)s::float8 IS NULL "
        "OR backend_start OPERATOR(pg_catalog.<) pg_catalog.to_timestamp(%(before)s::float8))",
        {"oids": oids, "before": started_before})


async def type_names(conn: Conn, oids: list[int]) -> dict[int, str]:
    """{type OID: name} of the types a session's driver did not know (dict rows)."""
    cur = await conn.execute(
        "SELECT oid, typname FROM pg_catalog.pg_type WHERE oid = ANY(%s::oid[])", [oids])
    return {row["oid"]: row["typname"] for row in await cur.fetchall()}
