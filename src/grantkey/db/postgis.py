"""PostGIS in a user database: installed by a superuser (it is not a trusted extension),
where the server has it."""

from __future__ import annotations

import secrets

import psycopg
from psycopg import sql

from grantkey.db.cluster import AdminConnection, Cluster
from grantkey.errors import TenantCodeInTheWay

# code in `public` that no extension brought: made by the database's owner (the master) or
# a key; PostGIS's install script runs as the superuser with `public` first in its path
_TENANT_CODE = """
SELECT EXISTS (
  SELECT FROM pg_catalog.pg_proc p WHERE p.pronamespace OPERATOR(pg_catalog.=) n.oid
    AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                    WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
                      AND d.objid OPERATOR(pg_catalog.=) p.oid
                      AND d.deptype OPERATOR(pg_catalog.=) 'e')
  UNION ALL
  SELECT FROM pg_catalog.pg_operator o WHERE o.oprnamespace OPERATOR(pg_catalog.=) n.oid
    AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d
                    WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_operator'::pg_catalog.regclass
                      AND d.objid OPERATOR(pg_catalog.=) o.oid
                      AND d.deptype OPERATOR(pg_catalog.=) 'e')) AS planted
FROM pg_catalog.pg_namespace n WHERE n.nspname OPERATOR(pg_catalog.=) 'public'
"""


async def install(su: AdminConnection) -> None:
    """CREATE EXTENSION postgis, if the server has it and `su` is a superuser, and only
    into a `public` that holds no code a tenant made (a database made before PostGIS was
    on the server: its master had time to plant some; TenantCodeInTheWay then)."""
    cur = await su.execute(
        "SELECT pg_catalog.current_setting('is_superuser') OPERATOR(pg_catalog.=) 'on' AS su, "
        "EXISTS (SELECT FROM pg_catalog.pg_available_extensions "
        "        WHERE name OPERATOR(pg_catalog.=) 'postgis') AS available")
    row = await cur.fetchone()
    if row is None or not row["su"] or not row["available"] or await installed(su):
        return
    cur = await su.execute(_TENANT_CODE)
    planted = await cur.fetchone()
    if planted is not None and planted["planted"]:
        raise TenantCodeInTheWay(
            "PostGIS not installed: schema public holds functions or operators the database's "
            "owner made, which PostGIS's install script (run as the superuser) could call; "
            "drop them (or install PostGIS by hand after checking them), then restart")
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


TEMPLATE = "grantkey_postgis"  # a database with PostGIS only, that user databases are cloned from


async def template_ready(conn: AdminConnection) -> bool:
    """Is there a PostGIS template made by grantkey's admin (the login of `conn`)? On a
    shared server another role may have made a database of that name: never clone it (what
    it holds would be in every user's database)."""
    cur = await conn.execute(
        "SELECT FROM pg_catalog.pg_database d WHERE d.datname OPERATOR(pg_catalog.=) %s "
        "AND d.datistemplate AND d.datdba OPERATOR(pg_catalog.=) (SELECT r.oid FROM "
        "pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) "
        "current_user)", [TEMPLATE])
    return await cur.fetchone() is not None


async def make_template(cluster: Cluster) -> bool:
    """The template user databases are cloned from, so that each does not run PostGIS's
    install script (about 0.2 s of the server's CPU): made under another name, given PostGIS
    by the superuser, then renamed, marked a template and closed to connections. False where
    there is no PostGIS or no superuser (user databases then start from template0)."""
    partial_name = f"{TEMPLATE}_{secrets.token_hex(4)}"
    async with cluster.autocommit() as conn:
        await conn.execute(sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(
            sql.Identifier(partial_name)))
        await conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(
            sql.Identifier(partial_name)))
    made = False
    try:
        async with cluster.superuser_session(partial_name) as su:
            await install(su)
            made = await installed(su)
        if made:
            async with cluster.autocommit() as conn:
                await conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(partial_name), sql.Identifier(TEMPLATE)))
                partial_name = TEMPLATE
                await conn.execute(sql.SQL(
                    "ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(
                    sql.Identifier(TEMPLATE)))
    except psycopg.errors.DuplicateDatabase:
        made = False  # another process made it first (or another role: see template_ready)
    finally:
        if partial_name != TEMPLATE:
            async with cluster.autocommit() as conn:
                await conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(
                    sql.Identifier(partial_name)))
    return made
