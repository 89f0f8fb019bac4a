"""What start-up repair reads and drops (`services/reconcile.py` decides)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from grantkey.domain import names

Conn = psycopg.AsyncConnection[Any]


@dataclass(frozen=True)
class ClusterState:
    pending: list[tuple[str, str]]  # (user id, database) of users not ready
    known: set[str]  # every user id
    databases: list[str]
    roles: list[str]  # every role whose name starts with gk_
    owners: dict[str, str]  # user id -> owner role, of ready users


async def cluster_state(conn: Conn) -> ClusterState:
    """From the metadata database (dict rows)."""
    async def rows(query: str, params: list[str] | None = None) -> list[dict[str, Any]]:
        cur = await conn.execute(query, params)
        return list(await cur.fetchall())

    pending = await rows("SELECT id, database FROM public.users WHERE state <> 'ready'")
    known = await rows("SELECT id FROM public.users")
    databases = await rows("SELECT datname FROM pg_catalog.pg_database")
    roles = await rows("SELECT rolname FROM pg_catalog.pg_roles "
                       "WHERE pg_catalog.starts_with(rolname::text, %s::text)",
                       [names.NAME_PREFIX])
    owners = await rows("SELECT id, owner_role FROM public.users WHERE state = 'ready'")
    return ClusterState(
        pending=[(row["id"], row["database"]) for row in pending],
        known={row["id"] for row in known},
        databases=[row["datname"] for row in databases],
        roles=[row["rolname"] for row in roles],
        owners={row["id"]: row["owner_role"] for row in owners})


async def drop_database(conn: Conn, datname: str) -> None:
    await conn.execute(
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(datname)))
