"""A per-user storage quota that client SQL cannot lift (off unless GRANTKEY_STORAGE_QUOTA).

Installed into each user database by the superuser (user migrations 5 and 7):

- `grantkey_meta.storage_quota`: one row, the limit in bytes (NULL: none), written only by
  grantkey's admin (it owns `grantkey_meta`; no client role can reach the schema);
- a statement trigger `grantkey_quota` (BEFORE INSERT OR UPDATE, so COPY, MERGE, views and
  partitions too) on every table of the database, temporary ones included, that refuses
  the statement while the database is larger than the limit;
- an event trigger at the end of every DDL command that puts the trigger back on any table
  that lacks it or has it disabled (a new table, `DROP TRIGGER`, `ALTER TABLE … DISABLE
  TRIGGER`): the master owns its tables and may run those commands, but never keeps the
  effect; `session_replication_role` is a superuser's setting;
- an event trigger before every DDL command that, over the limit, refuses all but DROP …
  and REVOKE (any other may store data: a table or index, a rewrite, or catalog text such
  as a comment, a view, a default or a function body);
- a sweep (services/quota_keeper.py: after each SQL API request of a user with a quota,
  and every second while one runs) for the tables PostgreSQL makes without firing any event
  trigger (`EXPLAIN ANALYZE CREATE TABLE AS …`, also from DO or a function): it gives them
  the trigger and, over the limit, withholds CREATE on every schema (`withhold_create`), so
  that no more can be made, until the database is back under it (`restore_create`); while
  withheld (a sequence, `create_withheld_flag`, read outside any snapshot) a client's change
  to a schema's privileges is refused. A client session blocking the sweep for over
  BLOCKER_SECONDS is ended.

Known limits (docs/security.md): a request that crosses the limit may make such tables
until the next sweep (about a second); a temporary one lives to the end of its request;
`COMMENT ON DATABASE` (a shared catalog, no event trigger) is outside the measure; VACUUM
FULL and CLUSTER fire no event trigger (a fillfactor lowered while under the limit lets
them grow a table up to ten times).

The quota is soft, as CARTO's: the statement that crosses the limit completes, and so may
others for up to MEASURE_SECONDS; every write after that is refused until rows or tables
are deleted. The size is PostgreSQL's own `pg_database_size` (a stat of every file of the
database: ~6 ms with 1,000 tables), so a measure under the limit is kept in
`grantkey_meta.storage_used` for MEASURE_SECONDS; one over it is made again at each
statement, so that deleting data reopens writes at once. With no limit, a write statement
pays one row read. The quota's functions belong to the superuser and run with a pinned
search_path; those SECURITY DEFINER take no arguments (`schema_acl`, which does, is not
one, and no client can run any of them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import psycopg
from psycopg import sql

from grantkey.db.cluster import AdminConnection, Cluster
from grantkey.errors import GrantkeyError

log = logging.getLogger("grantkey.quota")

TRIGGER = "grantkey_quota"
MESSAGE = "DB Quota exceeded"
MEASURE_SECONDS = 0.5  # how long a measure under the limit stands (in _FUNCTIONS_DDL)

_FUNCTIONS_DDL = """
CREATE OR REPLACE FUNCTION grantkey_meta.refuse_over_quota() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $quota$
DECLARE
  allowed bigint;
  used bigint;
  cached record;
BEGIN
  SELECT q.limit_bytes INTO allowed FROM grantkey_meta.storage_quota q;
  IF allowed IS NULL THEN
    RETURN;
  END IF;
  -- a measure under the limit from the last half second stands; any other is made again
  SELECT u.used_bytes, u.measured_at INTO cached FROM grantkey_meta.storage_used u;
  IF cached.measured_at > clock_timestamp() - interval '0.5 seconds'
     AND cached.used_bytes <= allowed THEN
    RETURN;
  END IF;
  used := pg_database_size(current_database());
  -- kept for the next half second, by whoever can without waiting (and without a serialization
  -- failure: only in READ COMMITTED transactions)
  IF current_setting('transaction_isolation') = 'read committed'
     AND current_setting('transaction_read_only') = 'off' THEN
    PERFORM 1 FROM grantkey_meta.storage_used u FOR UPDATE SKIP LOCKED;
    IF FOUND THEN
      UPDATE grantkey_meta.storage_used SET used_bytes = used, measured_at = clock_timestamp();
    END IF;
  END IF;
  IF used > allowed THEN
    RAISE EXCEPTION 'DB Quota exceeded' USING ERRCODE = '53400',
      HINT = format('This database holds %s of the %s allowed: delete rows or tables to '
                    'write again.', pg_size_pretty(used), pg_size_pretty(allowed));
  END IF;
END
$quota$;

CREATE OR REPLACE FUNCTION grantkey_meta.quota_before_write() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $quota$
BEGIN
  PERFORM grantkey_meta.refuse_over_quota();
  RETURN NULL;
END
$quota$;

CREATE OR REPLACE FUNCTION grantkey_meta.quota_before_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $quota$
BEGIN
  -- grantkey's own sessions (the superuser, and the admin: owner of grantkey_meta) pass
  IF session_user::text OPERATOR(pg_catalog.=) (
       SELECT n.nspowner::pg_catalog.regrole::text FROM pg_catalog.pg_namespace n
       WHERE n.nspname OPERATOR(pg_catalog.=) 'grantkey_meta')
     OR (SELECT r.rolsuper FROM pg_catalog.pg_roles r
         WHERE r.rolname OPERATOR(pg_catalog.=) session_user) THEN
    RETURN;
  END IF;
  -- over the limit, only what frees storage (DROP …, REVOKE) stays open: any other DDL
  -- may store data (in a new table or index, a rewrite, or the catalogs: a comment, a
  -- view's text, a default, a function's body)
  IF NOT (tg_tag LIKE 'DROP %' OR tg_tag = 'REVOKE') THEN
    PERFORM grantkey_meta.refuse_over_quota();
  END IF;
  IF tg_tag = ANY ('{ALTER SCHEMA,DROP OWNED,REASSIGN OWNED}'::text[]) THEN
    PERFORM grantkey_meta.refuse_while_withheld();
  END IF;
END
$quota$;

-- While CREATE is withheld, a client's change to a schema's privileges (GRANT or REVOKE on
-- a schema, ALTER SCHEMA, DROP or REASSIGN OWNED) would meet an ACL that is not the real
-- one: it is refused. The flag is a sequence: read outside any snapshot, so a transaction
-- that began before the withholding sees it too.
CREATE OR REPLACE FUNCTION grantkey_meta.refuse_while_withheld() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $quota$
BEGIN
  IF (SELECT f.last_value FROM grantkey_meta.create_withheld_flag f)
     OPERATOR(pg_catalog.<>) 0 THEN
    RAISE EXCEPTION 'schema privileges cannot change while the database is over its storage quota'
      USING ERRCODE = '53400',
            HINT = 'Delete rows or tables to bring the database under its quota, then try again.';
  END IF;
END
$quota$;

-- Every table of this database (this session's temporary ones included) that lacks an
-- enabled quota trigger gets one.
-- session_replication_role = replica while it runs: the triggers it makes fire no event
-- trigger (else each would run this again: N tables, N deep, N² replacements).
CREATE OR REPLACE FUNCTION grantkey_meta.add_quota_triggers() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET session_replication_role = replica AS $quota$
DECLARE
  missing record;
BEGIN
  FOR missing IN
    SELECT c.oid::pg_catalog.regclass AS rel
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
      LEFT JOIN pg_catalog.pg_trigger t ON t.tgrelid OPERATOR(pg_catalog.=) c.oid
           AND t.tgname OPERATOR(pg_catalog.=) 'grantkey_quota'
     WHERE c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::"char"[])
       AND n.nspname OPERATOR(pg_catalog.<>) ALL ('{information_schema,grantkey_meta}'::name[])
       AND (NOT pg_catalog.starts_with(n.nspname::text, 'pg_')
            OR n.oid OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema())
       -- missing, disabled, or replaced (CREATE OR REPLACE TRIGGER with another function,
       -- timing, events or condition)
       AND (t.oid IS NULL OR t.tgenabled <> ALL ('{O,A}'::"char"[])
            OR t.tgfoid <> 'grantkey_meta.quota_before_write()'::regprocedure
            OR t.tgtype <> 22  -- BEFORE (2) INSERT (4) OR UPDATE (16), FOR EACH STATEMENT
            OR t.tgqual IS NOT NULL OR t.tgnargs <> 0 OR t.tgattr <> ''::int2vector)
  LOOP
    -- replaced (enabled again), not ALTER TABLE … ENABLE: that is a command the quota
    -- refuses while over the limit
    BEGIN
      EXECUTE pg_catalog.format('CREATE OR REPLACE TRIGGER grantkey_quota '
                                'BEFORE INSERT OR UPDATE ON %s '
                                'FOR EACH STATEMENT EXECUTE FUNCTION '
                                'grantkey_meta.quota_before_write()', missing.rel);
    EXCEPTION WHEN lock_not_available THEN
      NULL;  -- held by a client past the lock timeout: the next sweep (which ends it) again
    END;
  END LOOP;
END
$quota$;

-- (It waits at most 100 ms for a lock: a table or schema a client holds is left to the
-- sweep, which ends the holder; a DDL command, grantkey's own included, never waits on it.)
CREATE OR REPLACE FUNCTION grantkey_meta.keep_quota_triggers() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET lock_timeout = '100ms' AS $quota$
BEGIN
  PERFORM grantkey_meta.add_quota_triggers();
  IF (SELECT f.last_value FROM grantkey_meta.create_withheld_flag f)
     OPERATOR(pg_catalog.=) 0 THEN
    RETURN;
  END IF;
  IF session_user::text OPERATOR(pg_catalog.<>) (
       SELECT n.nspowner::pg_catalog.regrole::text FROM pg_catalog.pg_namespace n
       WHERE n.nspname OPERATOR(pg_catalog.=) 'grantkey_meta')
     AND NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r
              WHERE r.rolname OPERATOR(pg_catalog.=) session_user)
     AND EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger_ddl_commands() d
                  WHERE d.command_tag = ANY ('{GRANT,REVOKE}'::text[])
                    AND d.object_type OPERATOR(pg_catalog.=) 'SCHEMA') THEN
    PERFORM grantkey_meta.refuse_while_withheld();
  END IF;
  -- what grantkey's admin granted meanwhile (a key made over the limit) is withheld too
  PERFORM grantkey_meta.withhold_create();
END
$quota$;

-- A schema's ACL rebuilt from its entries: without CREATE (restore false), or with the
-- CREATE entries withheld from it put back (restore true; those of dropped roles are not).
-- Entries are written as aclitem text, names quoted as aclitem input reads them.
CREATE OR REPLACE FUNCTION grantkey_meta.schema_acl(acl aclitem[], schema oid,
                                                    restore boolean, just_grantee oid)
RETURNS aclitem[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $quota$
  SELECT coalesce(array_agg(format('%s=%s/%s',
                                   CASE WHEN p.grantee = 0 THEN '' ELSE quote_ident(ge.rolname) END,
                                   p.privileges, quote_ident(gr.rolname))::aclitem
                            ORDER BY p.grantor, p.grantee), '{}')
    FROM (SELECT e.grantor, e.grantee,
                 string_agg(CASE e.privilege WHEN 'USAGE' THEN 'U' ELSE 'C' END
                            || CASE WHEN e.grantable THEN '*' ELSE '' END, ''
                            ORDER BY e.privilege DESC) AS privileges
            FROM (SELECT a.grantor, a.grantee, a.privilege, bool_or(a.grantable) AS grantable
                    FROM (SELECT x.grantor, x.grantee, x.privilege_type AS privilege,
                                 x.is_grantable AS grantable
                            FROM aclexplode(acl) x
                           WHERE restore OR x.privilege_type <> 'CREATE'
                          UNION ALL
                          SELECT w.grantor, w.grantee, 'CREATE', w.grantable
                            FROM grantkey_meta.create_withheld w
                           WHERE restore AND w.schema_oid = schema
                             AND (just_grantee IS NULL OR w.grantee = just_grantee)) a
                   GROUP BY a.grantor, a.grantee, a.privilege) e
           GROUP BY e.grantor, e.grantee) p
    LEFT JOIN pg_roles ge ON ge.oid = p.grantee
    JOIN pg_roles gr ON gr.oid = p.grantor
   WHERE p.grantee = 0 OR ge.oid IS NOT NULL
$quota$;

-- A schema's ACL (the default one if none), its row locked first and read after: a change
-- committed meanwhile is neither lost nor taken for what was there before.
CREATE OR REPLACE FUNCTION grantkey_meta.locked_schema_acl(schema oid) RETURNS aclitem[]
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $quota$
DECLARE
  acl aclitem[];
BEGIN
  PERFORM 1 FROM pg_namespace n WHERE n.oid = schema FOR UPDATE;
  SELECT coalesce(n.nspacl, acldefault('n', n.nspowner)) INTO acl
    FROM pg_namespace n WHERE n.oid = schema;
  RETURN acl;
END
$quota$;

-- Over the limit: no role keeps CREATE on any schema clients use, so that nothing can make
-- a table where no event trigger fires (EXPLAIN ANALYZE CREATE TABLE AS …). What is taken
-- is recorded in create_withheld and put back by restore_create. The ACLs are written in
-- the catalog, not by REVOKE: that keeps each entry's grantor and grant option and fires no
-- event trigger. Each schema's row is locked first and its ACL read after, so a change
-- committed meanwhile is neither lost nor recorded as withheld.
CREATE OR REPLACE FUNCTION grantkey_meta.withhold_create() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $quota$
DECLARE
  schema oid;
  acl aclitem[];
BEGIN
  FOR schema IN
    SELECT n.oid FROM pg_namespace n
     WHERE n.nspname <> ALL ('{information_schema,grantkey_meta}'::name[])
       AND NOT starts_with(n.nspname::text, 'pg_')
       AND EXISTS (SELECT 1 FROM aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) x
                    WHERE x.privilege_type = 'CREATE')
  LOOP
    BEGIN
      acl := grantkey_meta.locked_schema_acl(schema);
      INSERT INTO grantkey_meta.create_withheld (schema_oid, grantor, grantee, grantable)
      SELECT schema, x.grantor, x.grantee, x.is_grantable FROM aclexplode(acl) x
       WHERE x.privilege_type = 'CREATE'
      ON CONFLICT (schema_oid, grantor, grantee) DO UPDATE SET grantable = excluded.grantable;
      UPDATE pg_namespace n SET nspacl = grantkey_meta.schema_acl(acl, schema, false, NULL)
       WHERE n.oid = schema;
    EXCEPTION WHEN lock_not_available THEN
      NULL;  -- held by a client past the lock timeout: the next sweep (which ends it) again
    END;
  END LOOP;
END
$quota$;

CREATE OR REPLACE FUNCTION grantkey_meta.restore_create() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $quota$
DECLARE
  schema oid;
  acl aclitem[];
BEGIN
  FOR schema IN
    SELECT n.oid FROM pg_namespace n
     WHERE n.oid IN (SELECT w.schema_oid FROM grantkey_meta.create_withheld w)
  LOOP
    acl := grantkey_meta.locked_schema_acl(schema);
    UPDATE pg_namespace n SET nspacl = grantkey_meta.schema_acl(acl, schema, true, NULL)
     WHERE n.oid = schema;
    DELETE FROM grantkey_meta.create_withheld w WHERE w.schema_oid = schema;
  END LOOP;
  -- (only what was restored here: a schema withheld meanwhile, by a DDL command's end,
  -- keeps its records for the next sweep)
  DELETE FROM grantkey_meta.create_withheld w
   WHERE NOT EXISTS (SELECT 1 FROM pg_namespace n WHERE n.oid = w.schema_oid);
END
$quota$;

-- Before DROP OWNED BY a role (a deleted key's): its withheld CREATE goes back into the
-- ACLs, so that DROP OWNED revokes it (and its dependency on the schema) and DROP ROLE can
-- follow; the role has lost its login and memberships by then.
CREATE OR REPLACE FUNCTION grantkey_meta.return_withheld(role oid) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $quota$
DECLARE
  schema oid;
  acl aclitem[];
BEGIN
  FOR schema IN
    SELECT DISTINCT w.schema_oid FROM grantkey_meta.create_withheld w
      JOIN pg_namespace n ON n.oid = w.schema_oid WHERE w.grantee = role
  LOOP
    acl := grantkey_meta.locked_schema_acl(schema);
    UPDATE pg_namespace n SET nspacl = grantkey_meta.schema_acl(acl, schema, true, role)
     WHERE n.oid = schema;
    DELETE FROM grantkey_meta.create_withheld w
     WHERE w.schema_oid = schema AND w.grantee = role;
  END LOOP;
END
$quota$;

-- After each request of a user with a quota, and when the limit changes: over the limit,
-- withhold CREATE on schemas; back under it (or with no limit), put it back. True while
-- withheld.
CREATE OR REPLACE FUNCTION grantkey_meta.fit_create_to_quota() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $quota$
DECLARE
  allowed bigint;
  over boolean;
BEGIN
  -- one sweeper at a time (the limit's row: no client reaches it)
  SELECT q.limit_bytes INTO allowed FROM grantkey_meta.storage_quota q FOR UPDATE;
  over := allowed IS NOT NULL AND pg_database_size(current_database()) > allowed;
  IF over THEN
    -- the flag first (it is not transactional): from now on no client changes a schema's
    -- privileges, and every DDL command's end withholds too
    PERFORM setval('grantkey_meta.create_withheld_flag', 1);
    PERFORM grantkey_meta.withhold_create();
  ELSIF (SELECT f.last_value FROM grantkey_meta.create_withheld_flag f) <> 0
        OR EXISTS (SELECT 1 FROM grantkey_meta.create_withheld) THEN
    PERFORM grantkey_meta.restore_create();
    -- the flag last: a client's change racing it waits for the rows restored here
    PERFORM setval('grantkey_meta.create_withheld_flag', 0);
  END IF;
  RETURN over;
END
$quota$;
"""

_FUNCTIONS = ["refuse_over_quota()", "quota_before_write()", "quota_before_ddl()",
              "add_quota_triggers()", "keep_quota_triggers()",
              "schema_acl(aclitem[], oid, boolean, oid)", "locked_schema_acl(oid)",
              "withhold_create()", "restore_create()",
              "fit_create_to_quota()", "refuse_while_withheld()", "return_withheld(oid)"]
# What the quota withholds over the limit (see withhold_create). Made by the admin too
# (user migration 8) where there is no superuser: grantkey's queries about privilege roles
# read it.
WITHHELD_TABLES = """
CREATE TABLE IF NOT EXISTS grantkey_meta.create_withheld (
  schema_oid oid NOT NULL, grantor oid NOT NULL, grantee oid NOT NULL,
  grantable boolean NOT NULL, PRIMARY KEY (schema_oid, grantor, grantee));
CREATE SEQUENCE IF NOT EXISTS grantkey_meta.create_withheld_flag MINVALUE 0 MAXVALUE 1 START 0;
"""
KEEP_TRIGGER = "grantkey_quota_keep"
DDL_TRIGGER = "grantkey_quota_ddl"


async def install(su: AdminConnection) -> None:
    """As the superuser (user migration 5). Idempotent."""
    await su.execute(
        "CREATE TABLE IF NOT EXISTS grantkey_meta.storage_quota ("
        " one boolean PRIMARY KEY DEFAULT true CHECK (one),"
        " limit_bytes bigint CHECK (limit_bytes > 0))")
    await su.execute("INSERT INTO grantkey_meta.storage_quota (one) VALUES (true) "
                     "ON CONFLICT DO NOTHING")
    await su.execute(  # the last measure, written by the quota's functions only
        "CREATE TABLE IF NOT EXISTS grantkey_meta.storage_used ("
        " one boolean PRIMARY KEY DEFAULT true CHECK (one),"
        " used_bytes bigint NOT NULL DEFAULT 0,"
        " measured_at timestamptz NOT NULL DEFAULT '-infinity')")
    await su.execute("INSERT INTO grantkey_meta.storage_used (one) VALUES (true) "
                     "ON CONFLICT DO NOTHING")
    cur = await su.execute("SELECT n.nspowner::pg_catalog.regrole::text AS owner "
                           "FROM pg_catalog.pg_namespace n "
                           "WHERE n.nspname OPERATOR(pg_catalog.=) 'grantkey_meta'")
    row = await cur.fetchone()
    assert row is not None
    admin = sql.Identifier(row["owner"])
    await su.execute(WITHHELD_TABLES)
    cur = await su.execute(  # (ALTER … OWNER locks the table even when nothing changes)
        "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
        "ON n.oid OPERATOR(pg_catalog.=) c.relnamespace WHERE n.nspname OPERATOR(pg_catalog.=) "
        "'grantkey_meta' AND c.relname OPERATOR(pg_catalog.=) ANY (%s::name[]) "
        "AND c.relowner OPERATOR(pg_catalog.<>) n.nspowner",
        [["storage_quota", "create_withheld", "create_withheld_flag"]])
    for table in await cur.fetchall():
        await su.execute(sql.SQL("ALTER TABLE grantkey_meta.{} OWNER TO {}").format(
            sql.Identifier(table["relname"]), admin))
    await su.execute(_FUNCTIONS_DDL)
    for function in _FUNCTIONS:
        await su.execute(sql.SQL("REVOKE ALL ON FUNCTION grantkey_meta.{} FROM PUBLIC").format(
            sql.SQL(function)))
    for name in (KEEP_TRIGGER, DDL_TRIGGER):
        await su.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(name)))
    await su.execute(sql.SQL(
        "CREATE EVENT TRIGGER {} ON ddl_command_end "
        "EXECUTE FUNCTION grantkey_meta.keep_quota_triggers()").format(
            sql.Identifier(KEEP_TRIGGER)))
    await su.execute(sql.SQL(
        "CREATE EVENT TRIGGER {} ON ddl_command_start "
        "EXECUTE FUNCTION grantkey_meta.quota_before_ddl()").format(sql.Identifier(DDL_TRIGGER)))
    # the admin sweeps after requests of users with a quota (see `sweep`)
    for function in ("add_quota_triggers()", "fit_create_to_quota()", "return_withheld(oid)"):
        await su.execute(sql.SQL("GRANT EXECUTE ON FUNCTION grantkey_meta.{} TO {}").format(
            sql.SQL(function), admin))
    await su.execute("SELECT grantkey_meta.add_quota_triggers()")


async def set_limit(conn: AdminConnection, size: str) -> int | None:
    """Write this database's limit: a PostgreSQL size ('500MB') or '-1' for none. Returns
    the limit in bytes."""
    cur = await conn.execute(
        "UPDATE grantkey_meta.storage_quota SET limit_bytes = CASE WHEN %(size)s::text "
        "OPERATOR(pg_catalog.=) '-1' THEN NULL ELSE pg_catalog.pg_size_bytes(%(size)s::text) "
        "END RETURNING limit_bytes", {"size": size})
    row = await cur.fetchone()
    if await _has_fit(conn):
        await conn.execute("SELECT grantkey_meta.fit_create_to_quota()")
    return None if row is None or row["limit_bytes"] is None else int(row["limit_bytes"])


async def over_quota(conn: AdminConnection) -> str | None:
    """What the quota trigger would say now (its hint), or None while the database is
    within its limit (or has none). Reads grantkey's own table and the size only."""
    cur = await conn.execute(
        "SELECT q.limit_bytes, pg_catalog.pg_database_size(pg_catalog.current_database()) "
        "AS used FROM grantkey_meta.storage_quota q")
    row = await cur.fetchone()
    if row is None or row["limit_bytes"] is None or row["used"] <= row["limit_bytes"]:
        return None
    return (f"This database holds {row['used']:,} bytes of the {row['limit_bytes']:,} "
            "allowed: delete rows or tables to write again.")


BLOCKER_SECONDS = 1.0  # how long a client may hold a lock the sweep needs


async def sweep(cluster: Cluster, database: str) -> bool:
    """After each request of a user with a quota (and every second while one runs): over
    the limit, withhold CREATE on the database's schemas so that no table can be made where
    no event trigger fires (put back once under it); then give every table the trigger (for
    tables made so before). Each in its own transaction: a failure of one does not undo the
    other. A client session that holds a lock either needs for over BLOCKER_SECONDS is ended
    (else it could keep the quota off for as long as it holds it). False if a step failed
    (logged; the next sweep makes it again)."""
    done = True
    for statement, since_migration_7 in (("SELECT grantkey_meta.fit_create_to_quota()", True),
                                         ("SELECT grantkey_meta.add_quota_triggers()", False)):
        try:
            async with cluster.user_database(database) as conn:
                if since_migration_7 and not await _has_fit(conn):
                    continue
                await conn.execute("SET LOCAL lock_timeout = '3s'")
                await _ending_blockers(cluster, conn, database, statement)
        except (GrantkeyError, psycopg.Error) as error:
            log.info("quota sweep of a user database skipped: %s", type(error).__name__)
            done = False
    return done


async def _has_fit(conn: AdminConnection) -> bool:
    cur = await conn.execute(
        "SELECT pg_catalog.to_regprocedure('grantkey_meta.fit_create_to_quota()') IS NOT NULL "
        "AS present")
    row = await cur.fetchone()
    return row is not None and bool(row["present"])


async def _ending_blockers(cluster: Cluster, conn: AdminConnection, database: str,
                           statement: str) -> None:
    watchdog = asyncio.get_running_loop().create_task(
        _end_blockers(cluster, database, conn.info.backend_pid))
    try:
        await conn.execute(statement)
    finally:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog


async def _end_blockers(cluster: Cluster, database: str, pid: int) -> None:
    """Every BLOCKER_SECONDS until cancelled: end the client sessions of `database` at the
    root of what blocks the sweep's session `pid` (never grantkey's own: the admin's or a
    superuser's; never one that is only waiting)."""
    while True:
        await asyncio.sleep(BLOCKER_SECONDS)
        try:
            async with cluster.metadata() as meta:
                cur = await meta.execute(_END_BLOCKERS, {"pid": pid, "database": database})
                ended = len(await cur.fetchall())
        except (GrantkeyError, psycopg.Error) as error:
            log.info("could not end sessions blocking a quota sweep: %s", type(error).__name__)
            continue
        if ended:
            log.warning("ended %d client session(s) that held a lock the storage quota's "
                        "sweep needs", ended)


# The sessions at the root of what blocks the sweep (holding a lock, not waiting for one:
# a session that only waits in the same queue is not ended), clients of this database only.
_END_BLOCKERS = """
WITH RECURSIVE chain(pid) AS (
  SELECT b FROM pg_catalog.unnest(pg_catalog.pg_blocking_pids(%(pid)s::int)) AS b
  UNION
  SELECT b FROM chain c, pg_catalog.unnest(pg_catalog.pg_blocking_pids(c.pid)) AS b
)
SELECT pg_catalog.pg_terminate_backend(a.pid)
  FROM chain c JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) c.pid
  JOIN pg_catalog.pg_roles r ON r.rolname OPERATOR(pg_catalog.=) a.usename
 WHERE a.datname OPERATOR(pg_catalog.=) %(database)s::name
   AND a.usename OPERATOR(pg_catalog.<>) session_user AND NOT r.rolsuper
   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_locks l
                    WHERE l.pid OPERATOR(pg_catalog.=) a.pid AND NOT l.granted)
"""
