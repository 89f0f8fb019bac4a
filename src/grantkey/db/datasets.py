"""Dataset privacy (SELECT for the user's public role) and the metadata listing."""

from __future__ import annotations

from typing import Any

from psycopg import sql

from grantkey.db.cluster import AdminConnection
from grantkey.db.keys import storable
from grantkey.db.privileges import GRANTABLE_RELKINDS, HIDDEN_SCHEMAS

_LISTED = """
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN grantkey_meta.datasets d ON d.table_oid = c.oid
WHERE c.relkind::text = ANY(%(relkinds)s::text[]) AND n.nspname::text <> ALL(%(hidden)s::text[])
  AND NOT pg_catalog.starts_with(n.nspname::text, 'pg_'::text)
  AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend e
                  WHERE e.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                    AND e.objid OPERATOR(pg_catalog.=) c.oid
                    AND e.deptype OPERATOR(pg_catalog.=) 'e')
"""
_PRIVACY = """
CASE WHEN NOT pg_catalog.has_table_privilege(%(public_role)s::name, c.oid, 'SELECT'::text) THEN 'private'
     ELSE coalesce(d.privacy, 'public') END
"""
_MODE = """
CASE WHEN pg_catalog.has_table_privilege(%(caller)s::name, c.oid, 'INSERT, UPDATE, DELETE'::text) THEN 'rw'
     WHEN pg_catalog.has_table_privilege(%(caller)s::name, c.oid, 'SELECT'::text) THEN 'r' END
"""


async def find_table(conn: AdminConnection, schema: str, name: str) -> int | None:
    if not (storable(schema) and storable(name)):
        return None
    cur = await conn.execute(
        "SELECT c.oid " + _LISTED + " AND n.nspname = %(schema)s AND c.relname = %(name)s",
        {"relkinds": GRANTABLE_RELKINDS, "hidden": HIDDEN_SCHEMAS, "schema": schema,
         "name": name},
    )
    row = await cur.fetchone()
    return None if row is None else int(row["oid"])


_ANCESTOR = """
SELECT p.oid::pg_catalog.regclass::text AS parent FROM pg_catalog.pg_inherits i
  JOIN pg_catalog.pg_class p ON p.oid = i.inhparent WHERE i.inhrelid = %s::oid LIMIT 1
"""
_DESCENDANTS = """
WITH RECURSIVE tree(oid) AS (
    SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent = %(oid)s::oid
    UNION
    SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree t ON i.inhparent = t.oid
)
SELECT t.oid, n.nspname::text AS schema, c.relname::text AS name FROM tree t
  JOIN pg_catalog.pg_class c ON c.oid = t.oid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
"""


async def parent_of(conn: AdminConnection, table_oid: int) -> str | None:
    """The table this one inherits from or is a partition of, if any."""
    cur = await conn.execute(_ANCESTOR, [table_oid])
    row = await cur.fetchone()
    return None if row is None else str(row["parent"])


async def descendants(conn: AdminConnection, table_oid: int) -> list[dict[str, Any]]:
    """Every table that inherits from this one, or is a partition of it, at any depth."""
    cur = await conn.execute(_DESCENDANTS, {"oid": table_oid})
    return list(await cur.fetchall())


async def set_privacy(
    conn: AdminConnection, table_oid: int, schema: str, name: str, privacy: str, reader_role: str
) -> None:
    """Public and link tables: SELECT for the user's reader role (the default public key's
    role and every key role are its members)."""
    table, role = sql.Identifier(schema, name), sql.Identifier(reader_role)
    if privacy == "private":
        await conn.execute(sql.SQL("REVOKE SELECT ON {} FROM {}").format(table, role))
        await conn.execute("DELETE FROM grantkey_meta.datasets WHERE table_oid = %s", [table_oid])
        return
    await conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
        sql.Identifier(schema), role))
    await conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(table, role))
    await conn.execute(
        "INSERT INTO grantkey_meta.datasets (table_oid, privacy) VALUES (%s, %s) "
        "ON CONFLICT (table_oid) DO UPDATE SET privacy = excluded.privacy, updated_at = now()",
        [table_oid, privacy],
    )


async def list_datasets(
    conn: AdminConnection, *, public_role: str, caller: str, limit: int, offset: int,
    table_oid: int | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    params = {"relkinds": GRANTABLE_RELKINDS, "hidden": HIDDEN_SCHEMAS, "limit": limit,
              "offset": offset, "public_role": public_role, "caller": caller, "oid": table_oid}
    only = " AND c.oid = %(oid)s" if table_oid is not None else ""
    cur = await conn.execute("SELECT count(*) AS n " + _LISTED + only, params)
    total = await cur.fetchone()
    cur = await conn.execute(
        f"SELECT n.nspname AS schema, c.relname AS name, {_PRIVACY} AS privacy, "
        f"d.updated_at, {_MODE} AS mode " + _LISTED + only
        + " ORDER BY n.nspname, c.relname LIMIT %(limit)s OFFSET %(offset)s",
        params,
    )
    return (int(total["n"]) if total else 0), list(await cur.fetchall())
