"""PostGIS in a user database: installed by a superuser (it is not a trusted extension),
where the server has it."""

from __future__ import annotations

from grantkey.db.cluster import AdminConnection


async def install(su: AdminConnection) -> None:
    """CREATE EXTENSION postgis, if the server has it and `su` is a superuser."""
    cur = await su.execute(
        "SELECT pg_catalog.current_setting('is_superuser') OPERATOR(pg_catalog.=) 'on' AS su, "
        "EXISTS (SELECT FROM pg_catalog.pg_available_extensions "
        "        WHERE name OPERATOR(pg_catalog.=) 'postgis') AS available")
    row = await cur.fetchone()
    if row is not None and row["su"] and row["available"]:
        await su.execute("CREATE EXTENSION IF NOT EXISTS postgis SCHEMA public")


async def installed(conn: AdminConnection) -> bool:
    cur = await conn.execute(
        "SELECT FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'postgis'")
    return await cur.fetchone() is not None


async def schema(conn: AdminConnection) -> str | None:
    """The schema PostGIS is installed in, if it is."""
    cur = await conn.execute(
        "SELECT n.nspname::text AS name FROM pg_catalog.pg_extension e "
        "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace "
        "WHERE e.extname OPERATOR(pg_catalog.=) 'postgis'")
    row = await cur.fetchone()
    return None if row is None else str(row["name"])
