"""Numbered migrations: for the metadata database, and for every user database.

Each database records what it has in a `schema_migrations` table (version, name, time).
A new user database is made at the current state by `users.harden_database` (version 1)
and then runs every later migration; an existing one runs, at start-up, each migration it
has not recorded, in order, each in its own savepoint, under an advisory lock in the
metadata database so that two servers starting together do not race. A user database made
before migrations existed is at version 1.

Some migrations need a PostgreSQL superuser (an event trigger, revoking EXECUTE on
built-in functions). On a server whose admin role is not one, they are skipped (and the
features that depend on them refused, see `guard_installed`); they run at a later start
once a superuser is there.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from psycopg import sql

from grantkey.db import postgis, storage_quota, usage
from grantkey.db.cluster import AdminConnection
from grantkey.domain import names

log = logging.getLogger("grantkey.migrations")
MIGRATION_LOCK = (0x676B, 0x6D69)  # advisory lock ("gk", "mi") held while migrating
GUARD_TRIGGER = "grantkey_guard"

# What a regular key (or the default public key) may run: tables and what tables need.
# Everything else a DDL event trigger sees is refused for them, and so is any DDL run after
# SET ROLE (objects owned by a shared privilege role would outlive the key).
KEY_DDL = [
    "CREATE TABLE", "CREATE TABLE AS", "SELECT INTO", "ALTER TABLE", "DROP TABLE",
    "CREATE INDEX", "ALTER INDEX", "DROP INDEX", "REINDEX",
    "CREATE SEQUENCE", "ALTER SEQUENCE", "DROP SEQUENCE",
    "CREATE VIEW", "ALTER VIEW", "DROP VIEW",
    "CREATE MATERIALIZED VIEW", "ALTER MATERIALIZED VIEW", "DROP MATERIALIZED VIEW",
    "REFRESH MATERIALIZED VIEW", "CREATE STATISTICS", "ALTER STATISTICS", "DROP STATISTICS",
    "COMMENT", "GRANT", "REVOKE", "ALTER DEFAULT PRIVILEGES",
]
KEY_ROLE_PATTERN = names.KEY_ROLE_PATTERN
_GUARD_FUNCTION = """
CREATE OR REPLACE FUNCTION grantkey_meta.refuse_key_code() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $guard$
BEGIN
  IF session_user::text OPERATOR(pg_catalog.~) {pattern}
     AND NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r  -- grantkey's own triggers
              WHERE r.rolname OPERATOR(pg_catalog.=) current_user)
     AND (tg_tag OPERATOR(pg_catalog.<>) ALL ({allowed}::text[])
          OR current_user OPERATOR(pg_catalog.<>) session_user) THEN
    RAISE EXCEPTION 'permission denied: an API key cannot run %', tg_tag
      USING ERRCODE = '42501',
            HINT = 'API keys may create tables, indexes, sequences and views; '
                   'functions, operators, triggers, rules and types need the master key.';
  END IF;
END
$guard$
"""
# After the command: nothing a key created or changed may belong to anyone else (ALTER …
# OWNER TO a shared privilege role would keep it alive, and usable by others, after the
# key is gone).
_OWNER_FUNCTION = """
CREATE OR REPLACE FUNCTION grantkey_meta.refuse_given_away() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $guard$
BEGIN
  IF session_user::text OPERATOR(pg_catalog.~) {pattern} AND EXISTS (
       SELECT 1 FROM pg_catalog.pg_event_trigger_ddl_commands() d
       JOIN pg_catalog.pg_class c ON c.oid = d.objid
       WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
         AND c.relowner OPERATOR(pg_catalog.<>) (
             SELECT r.oid FROM pg_catalog.pg_roles r
             WHERE r.rolname OPERATOR(pg_catalog.=) session_user)) THEN
    RAISE EXCEPTION 'permission denied: an API key cannot give away what it owns'
      USING ERRCODE = '42501';
  END IF;
END
$guard$
"""
OWNER_TRIGGER = "grantkey_guard_owner"
# Large objects are persistent storage outside any table, quota or grant model.
_LARGE_OBJECT_CREATORS = ["lo_create(oid)", "lo_creat(integer)", "lo_from_bytea(oid, bytea)",
                          "lo_import(text)", "lo_import(text, oid)"]

Apply = Callable[[AdminConnection], Awaitable[None]]
SuperuserSession = Callable[[], AbstractAsyncContextManager[AdminConnection]]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: Apply
    needs_superuser: bool = False


async def _install_guard(conn: AdminConnection) -> None:
    await conn.execute(sql.SQL(_GUARD_FUNCTION).format(
        pattern=sql.Literal(KEY_ROLE_PATTERN), allowed=sql.Literal(KEY_DDL)))
    await conn.execute("REVOKE ALL ON FUNCTION grantkey_meta.refuse_key_code() FROM PUBLIC")
    await conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(
        sql.Identifier(GUARD_TRIGGER)))
    await conn.execute(sql.SQL(
        "CREATE EVENT TRIGGER {} ON ddl_command_start "
        "EXECUTE FUNCTION grantkey_meta.refuse_key_code()").format(sql.Identifier(GUARD_TRIGGER)))
    await conn.execute(sql.SQL(_OWNER_FUNCTION).format(pattern=sql.Literal(KEY_ROLE_PATTERN)))
    await conn.execute("REVOKE ALL ON FUNCTION grantkey_meta.refuse_given_away() FROM PUBLIC")
    await conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(
        sql.Identifier(OWNER_TRIGGER)))
    await conn.execute(sql.SQL(
        "CREATE EVENT TRIGGER {} ON ddl_command_end "
        "EXECUTE FUNCTION grantkey_meta.refuse_given_away()").format(
            sql.Identifier(OWNER_TRIGGER)))


async def _close_large_objects(conn: AdminConnection) -> None:
    for signature in _LARGE_OBJECT_CREATORS:
        await conn.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION pg_catalog.{} FROM PUBLIC").format(
            sql.SQL(signature)))


# Every relation or schema the public login role was granted something on directly: the
# grants move to the reader role.
_PUBLIC_ROLE_GRANTS = """
SELECT 'TABLE' AS kind, c.oid::pg_catalog.regclass::text AS target, a.privilege_type AS privilege
  FROM pg_catalog.pg_class c CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
 WHERE c.relacl IS NOT NULL AND a.grantee = %(role)s::pg_catalog.regrole
UNION ALL
SELECT 'SCHEMA', pg_catalog.quote_ident(n.nspname), a.privilege_type
  FROM pg_catalog.pg_namespace n CROSS JOIN LATERAL pg_catalog.aclexplode(n.nspacl) a
 WHERE n.nspacl IS NOT NULL AND a.grantee = %(role)s::pg_catalog.regrole
"""


async def _reader_role(conn: AdminConnection) -> None:
    """Keys stop being members of the default public key's login role: a reader role
    holds what public tables grant, and both it and the keys join that."""
    cur = await conn.execute("SELECT pg_catalog.current_database()::text AS db")
    row = await cur.fetchone()
    assert row is not None
    user_id = names.user_id_of_database(row["db"])
    public, reader = names.public_role(user_id), names.reader_role(user_id)
    cur = await conn.execute("SELECT 1 FROM pg_catalog.pg_roles "
                             "WHERE rolname OPERATOR(pg_catalog.=) %s::text", [reader])
    if await cur.fetchone() is None:
        await conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(reader)))
    await conn.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(
        sql.Identifier(row["db"]), sql.Identifier(reader)))
    cur = await conn.execute(_PUBLIC_ROLE_GRANTS, {"role": public})
    for grant in await cur.fetchall():
        kind, target = sql.SQL(grant["kind"]), sql.SQL(grant["target"])
        privilege = sql.SQL(grant["privilege"])
        await conn.execute(sql.SQL("GRANT {} ON {} {} TO {}").format(
            privilege, kind, target, sql.Identifier(reader)))
        await conn.execute(sql.SQL("REVOKE {} ON {} {} FROM {}").format(
            privilege, kind, target, sql.Identifier(public)))
    await conn.execute(sql.SQL("GRANT {} TO {}").format(
        sql.Identifier(reader), sql.Identifier(public)))
    cur = await conn.execute(  # the user's key roles only (not the admin, also a member)
        "SELECT r.rolname::text AS rolname FROM pg_catalog.pg_auth_members m "
        "JOIN pg_catalog.pg_roles r ON r.oid = m.member "
        "WHERE m.roleid = %s::pg_catalog.regrole "
        "AND pg_catalog.starts_with(r.rolname::text, %s::text)",
        [public, names.user_role_prefix(user_id) + "k"])
    for member in await cur.fetchall():
        key = sql.Identifier(member["rolname"])
        await conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(reader), key))
        await conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(public), key))


async def _storage_quota(su: AdminConnection) -> None:
    await _install_guard(su)  # it lets the quota's own (superuser) triggers through
    await storage_quota.install(su)


async def _routine_admin_manages(conn: AdminConnection) -> None:
    """A marker with a check: `services.upgrade` hands a database an earlier release made
    as the superuser to the routine admin (`users.hand_over_user_database`) before it
    migrates it; from here on the admin that migrates must own grantkey's schema."""
    cur = await conn.execute(
        "SELECT pg_catalog.pg_has_role(n.nspowner, 'USAGE') AS owns FROM pg_catalog.pg_namespace n "
        "WHERE n.nspname OPERATOR(pg_catalog.=) 'grantkey_meta'")
    row = await cur.fetchone()
    if row is None or not row["owns"]:
        raise RuntimeError("grantkey_meta is not the admin's: it was not handed over")


async def _withheld_tables(conn: AdminConnection) -> None:
    """Made by the quota's installation, and here (by the admin) where there is no superuser:
    grantkey's queries about privilege roles read them, with a quota or without one."""
    await conn.execute(storage_quota.WITHHELD_TABLES)


async def _postgis(su: AdminConnection) -> None:
    """A superuser's CREATE EXTENSION, after the guard and the quota (which leave a
    superuser's DDL alone); on a server without PostGIS, nothing (a server that gains it
    later gives it to new users). Refused, and retried at the next start, while `public`
    holds code the tenant made (`postgis.install`)."""
    await postgis.install(su)


async def _key_lifetime(conn: AdminConnection) -> None:
    await conn.execute(
        "ALTER TABLE grantkey_meta.api_keys ADD COLUMN expires_at timestamptz, "
        "ADD COLUMN sql_timeout double precision, ADD COLUMN token_rotated_at timestamptz, "
        "ADD COLUMN grace_digest bytea UNIQUE, ADD COLUMN grace_until timestamptz, "
        "ADD COLUMN grace_password bytea")


async def _key_usage(conn: AdminConnection) -> None:
    await conn.execute("ALTER TABLE grantkey_meta.api_keys ADD COLUMN last_used_at timestamptz")
    await conn.execute(usage.TABLE)


async def _key_restrictions(conn: AdminConnection) -> None:
    await conn.execute("ALTER TABLE grantkey_meta.api_keys ADD COLUMN restrictions jsonb")


async def _key_rate_limit(conn: AdminConnection) -> None:
    await conn.execute("ALTER TABLE grantkey_meta.api_keys ADD COLUMN rate_limit jsonb")


QUOTA_VERSION = 5  # from this version on, a user database can hold a storage quota
USER_MIGRATIONS = [
    Migration(2, "guard: keys create tables, never code", _install_guard, needs_superuser=True),
    Migration(3, "clients cannot create large objects", _close_large_objects,
              needs_superuser=True),
    Migration(4, "keys read public tables through a reader role, not the public login role",
              _reader_role),
    Migration(QUOTA_VERSION, "storage quota: a trigger on every table", _storage_quota,
              needs_superuser=True),
    Migration(6, "grantkey's routine admin (not a superuser) manages the database",
              _routine_admin_manages),
    Migration(7, "storage quota: CREATE on schemas withheld over the limit",
              storage_quota.install, needs_superuser=True),
    # after 7: a superuser migration runs in a session of its own, committed first; one
    # that made these tables in this transaction would wait for it forever
    Migration(8, "storage quota: where CREATE withheld is kept, with or without a superuser",
              _withheld_tables),
    Migration(9, "PostGIS, where the server has it (databases made before it was there)",
              _postgis, needs_superuser=True),
    Migration(10, "keys: an expiry, a SQL time limit of their own, the old token's grace",
              _key_lifetime),
    Migration(11, "keys: a rate limit of their own", _key_rate_limit),
    Migration(12, "keys: the client addresses and web origins they may be used from",
              _key_restrictions),
    Migration(13, "keys: when last used, and requests per day and API", _key_usage),
]
USER_BASELINE = 1  # what users.harden_database makes


async def _is_superuser(conn: AdminConnection) -> bool:
    cur = await conn.execute("SELECT pg_catalog.current_setting('is_superuser') AS su")
    row = await cur.fetchone()
    return row is not None and row["su"] == "on"


async def _recorded(conn: AdminConnection, table: str, baseline: int | None) -> set[int]:
    schema, _, name = table.partition(".")
    cur = await conn.execute("SELECT pg_catalog.to_regclass(%s) IS NULL AS missing", [table])
    row = await cur.fetchone()
    ident = sql.Identifier(schema, name)
    if row is not None and row["missing"]:
        await conn.execute(sql.SQL(
            "CREATE TABLE {} (version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())").format(ident))
        if baseline is not None:
            await conn.execute(sql.SQL("INSERT INTO {} (version, name) VALUES (%s, %s)").format(
                ident), [baseline, "baseline"])
    cur = await conn.execute(sql.SQL("SELECT version FROM {}").format(ident))
    return {int(r["version"]) for r in await cur.fetchall()}


async def run(conn: AdminConnection, migrations: list[Migration], table: str,
              baseline: int | None, superuser: SuperuserSession | None = None) -> list[int]:
    """Apply, in `conn`'s transaction, every migration `table` has not recorded. Returns
    the versions applied. A migration that fails rolls back alone and stops the run. One
    that needs a superuser runs in a `superuser()` session of its own (committed first:
    such migrations are idempotent), or is skipped where there is none."""
    done = await _recorded(conn, table, baseline)
    schema, _, name = table.partition(".")
    applied = []
    for migration in sorted(migrations, key=lambda m: m.version):
        if migration.version in done:
            continue
        if migration.needs_superuser and not await _as_superuser(conn, migration, superuser):
            log.info("migration %s (%s) needs a superuser: skipped", migration.version,
                     migration.name)
            continue
        async with conn.transaction():
            if not migration.needs_superuser:
                await migration.apply(conn)
            await conn.execute(sql.SQL("INSERT INTO {} (version, name) VALUES (%s, %s)").format(
                sql.Identifier(schema, name)), [migration.version, migration.name])
        applied.append(migration.version)
    return applied


async def _as_superuser(conn: AdminConnection, migration: Migration,
                        superuser: SuperuserSession | None) -> bool:
    """Apply a superuser-only migration; False if no superuser is at hand."""
    if superuser is None:
        if not await _is_superuser(conn):
            return False
        async with conn.transaction():
            await migration.apply(conn)
        return True
    async with superuser() as session:
        if not await _is_superuser(session):
            return False
        await migration.apply(session)
    return True


USER_LATEST = max(m.version for m in USER_MIGRATIONS)


async def run_user_migrations(conn: AdminConnection,
                              superuser: SuperuserSession | None = None) -> int:
    """Bring one user database up to date. Returns its version: the highest N such that
    every migration up to N is recorded (below USER_LATEST while a superuser-only one
    could not run)."""
    await run(conn, USER_MIGRATIONS, "grantkey_meta.schema_migrations", USER_BASELINE,
              superuser)
    done = await _recorded(conn, "grantkey_meta.schema_migrations", USER_BASELINE)
    version = USER_BASELINE
    for migration in sorted(USER_MIGRATIONS, key=lambda m: m.version):
        if migration.version not in done:
            break
        version = migration.version
    return version


async def guard_installed(conn: AdminConnection) -> bool:
    """Is the guard that stops keys creating code active in this database?"""
    cur = await conn.execute(
        "SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname OPERATOR(pg_catalog.=) %s::text "
        "AND evtenabled OPERATOR(pg_catalog.<>) 'D'", [GUARD_TRIGGER])
    return await cur.fetchone() is not None
