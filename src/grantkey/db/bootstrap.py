"""Creating and migrating the metadata database, and hardening the cluster for keys."""

from __future__ import annotations

from functools import partial

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from grantkey.db import audit, migrations
from grantkey.db.cluster import METADATA_DATABASE, AdminConnection, admin_conninfo, translated
from grantkey.db.jobs import JOBS_DDL
from grantkey.db.layergroups import LAYERGROUPS_DDL
from grantkey.db.named_maps import NAMED_MAPS_DDL
from grantkey.db.revocations import REVOCATIONS_DDL, REVOKED_TOKENS_DDL
from grantkey.domain import names

METADATA_SCHEMA = """
CREATE TABLE IF NOT EXISTS public.users (
    id          text PRIMARY KEY,
    username    text NOT NULL UNIQUE,
    database    text NOT NULL UNIQUE,
    owner_role  text NOT NULL,
    public_role text NOT NULL,
    state       text NOT NULL DEFAULT 'creating'
                CHECK (state IN ('creating', 'ready', 'deleting')),
    created_at  timestamptz NOT NULL DEFAULT now()
)
"""


def maintenance_url(admin_url: str) -> str:
    """The admin URL pointed at the database it names, or `postgres` if it names none."""
    params = conninfo_to_dict(admin_url)
    params.setdefault("dbname", "postgres")
    if params["dbname"] == METADATA_DATABASE:
        params["dbname"] = "postgres"
    return admin_conninfo(make_conninfo("", **params))


async def bootstrap(admin_url: str) -> None:
    """Make sure the metadata database exists, is closed to key roles, and is migrated."""
    async with translated():
        await _bootstrap(admin_url)


async def _bootstrap(admin_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(
        maintenance_url(admin_url), autocommit=True
    ) as conn:
        cur = await conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [METADATA_DATABASE]
        )
        if await cur.fetchone() is None:
            await conn.execute(
                sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(
                    sql.Identifier(METADATA_DATABASE)
                )
            )
        await _revoke_public_connect(conn)
    async with await psycopg.AsyncConnection.connect(
        admin_conninfo(admin_url, dbname=METADATA_DATABASE), row_factory=dict_row
    ) as conn:
        await conn.execute("SELECT pg_catalog.pg_advisory_xact_lock(%s, %s)",
                           list(migrations.MIGRATION_LOCK))
        await conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        await migrations.run(conn, METADATA_MIGRATIONS, "public.schema_migrations", None)


async def _execute(statement: str, conn: AdminConnection) -> None:
    await conn.execute(statement)


METADATA_MIGRATIONS = [
    migrations.Migration(1, "users", partial(_execute, METADATA_SCHEMA)),
    migrations.Migration(2, "pending revocations", partial(_execute, REVOCATIONS_DDL)),
    migrations.Migration(3, "user database versions", partial(
        _execute, "ALTER TABLE public.users ADD COLUMN IF NOT EXISTS schema_version integer "
                  "NOT NULL DEFAULT 1")),
    migrations.Migration(4, "revoked tokens", partial(_execute, REVOKED_TOKENS_DDL)),
    migrations.Migration(5, "storage quota applied to each user database", partial(
        _execute, "ALTER TABLE public.users ADD COLUMN IF NOT EXISTS storage_quota text "
                  "NOT NULL DEFAULT '-1'")),
    migrations.Migration(6, "audit log: append-only, one row per change", audit.install),
    migrations.Migration(7, "Maps API layergroups", partial(_execute, LAYERGROUPS_DDL)),
    migrations.Migration(8, "Maps API named maps", partial(_execute, NAMED_MAPS_DDL)),
    migrations.Migration(9, "batch SQL jobs", partial(_execute, JOBS_DDL)),
]


async def _revoke_public_connect(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    """Key roles may connect only to their own user's database.

    The databases grantkey did not create may belong to someone else on an external
    server: try each, and leave alone those this login does not own.
    """
    cur = await conn.execute(
        "SELECT datname FROM pg_database WHERE datallowconn AND "
        "(datname = %s OR pg_has_role(datdba, 'USAGE') OR "
        " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user))",
        [METADATA_DATABASE],
    )
    for (datname,) in await cur.fetchall():
        if str(datname).startswith(names.NAME_PREFIX):
            continue
        await conn.execute(
            sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(
                sql.Identifier(str(datname))
            )
        )


async def apply_cluster_limits(admin_url: str, temp_file_limit: str) -> None:
    async with translated():
        await _apply_cluster_limits(admin_url, temp_file_limit)


async def _apply_cluster_limits(admin_url: str, temp_file_limit: str) -> None:
    """Limits for a cluster grantkey owns (the embedded one): ALTER SYSTEM, then a reload.
    `temp_file_limit` can only be changed by a superuser, so clients cannot lift it."""
    async with await psycopg.AsyncConnection.connect(
        maintenance_url(admin_url), autocommit=True
    ) as conn:
        await conn.execute(sql.SQL("ALTER SYSTEM SET temp_file_limit = {}").format(
            sql.Literal(temp_file_limit)))
        await conn.execute("SELECT pg_catalog.pg_reload_conf()")


async def prepare_routine_admin(superuser_url: str, role: str) -> None:
    """As the superuser: make the routine admin role (not a superuser) and hand it the
    metadata database, which an earlier release made as the superuser. Idempotent."""
    async with await psycopg.AsyncConnection.connect(
        maintenance_url(superuser_url), autocommit=True, row_factory=dict_row
    ) as conn:
        cur = await conn.execute("SELECT 1 FROM pg_catalog.pg_roles "
                                 "WHERE rolname OPERATOR(pg_catalog.=) %s::text", [role])
        ident = sql.Identifier(role)
        if await cur.fetchone() is None:
            await conn.execute(sql.SQL(
                "CREATE ROLE {} LOGIN CREATEDB CREATEROLE NOSUPERUSER NOREPLICATION "
                "NOBYPASSRLS").format(ident))
        await conn.execute(sql.SQL("GRANT pg_signal_backend TO {}").format(ident))
        await conn.execute(sql.SQL("GRANT CONNECT ON DATABASE postgres TO {}").format(ident))
    async with await psycopg.AsyncConnection.connect(
        maintenance_url(superuser_url), autocommit=True
    ) as plain:  # only the owner can close `postgres` and `template1` to key roles
        await _revoke_public_connect(plain)
    async with await psycopg.AsyncConnection.connect(
        maintenance_url(superuser_url), autocommit=True, row_factory=dict_row
    ) as conn:
        cur = await conn.execute("SELECT 1 FROM pg_catalog.pg_database "
                                 "WHERE datname OPERATOR(pg_catalog.=) %s::text",
                                 [METADATA_DATABASE])
        if await cur.fetchone() is None:
            return
        await conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
            sql.Identifier(METADATA_DATABASE), ident))
    async with await psycopg.AsyncConnection.connect(
        admin_conninfo(superuser_url, dbname=METADATA_DATABASE), autocommit=True,
        row_factory=dict_row
    ) as conn:
        await hand_over_schema(conn, "public", role)


async def hand_over_schema(conn: AdminConnection, schema: str, role: str) -> None:
    """The schema and every table and sequence in it become `role`'s."""
    ident = sql.Identifier(role)
    await conn.execute(sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(sql.Identifier(schema), ident))
    cur = await conn.execute(
        "SELECT c.relname::text AS relname FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname OPERATOR(pg_catalog.=) %s::text AND c.relkind IN ('r', 'p', 'S') "
        "AND c.relowner <> %s::pg_catalog.regrole "
        # a sequence owned by a column (serial, identity) follows its table; altered on its
        # own it is refused
        "AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d "
        "  WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = c.oid "
        "  AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass "
        "  AND d.deptype IN ('a', 'i'))", [schema, role])
    for row in await cur.fetchall():
        await conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(
            sql.Identifier(schema, row["relname"]), ident))
