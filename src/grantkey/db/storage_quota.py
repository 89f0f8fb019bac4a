"""A per-user storage quota that client SQL cannot lift (off unless GRANTKEY_STORAGE_QUOTA).

Installed into each user database by the superuser (user migration 5):

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
- a sweep after each SQL API request of a user with a quota, for the tables PostgreSQL
  makes without firing any event trigger (`EXPLAIN ANALYZE CREATE TABLE AS …`, also from
  DO or a function).

Known limits (docs/security.md): such an EXPLAIN ANALYZE still runs over the limit, so each
request may copy data into a new table until the sweep after it; `COMMENT ON DATABASE`
(a shared catalog, no event trigger) is outside the measure; VACUUM FULL and CLUSTER fire no
event trigger (a fillfactor lowered while under the limit lets them grow a table up to ten times).

The quota is soft, as CARTO's: the statement that crosses the limit completes, and so may
others for up to MEASURE_SECONDS; every write after that is refused until rows or tables
are deleted. The size is PostgreSQL's own `pg_database_size` (a stat of every file of the
database: ~6 ms with 1,000 tables), so a measure under the limit is kept in
`grantkey_meta.storage_used` for MEASURE_SECONDS; one over it is made again at each
statement, so that deleting data reopens writes at once. With no limit, a write statement
pays one row read. The triggers' functions belong to the superuser, run with a pinned
search_path and take no arguments.
"""

from __future__ import annotations

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
  -- over the limit, only what frees storage (DROP …, REVOKE) stays open: any other DDL
  -- may store data (in a new table or index, a rewrite, or the catalogs: a comment, a
  -- view's text, a default, a function's body)
  IF tg_tag LIKE 'DROP %' OR tg_tag = 'REVOKE' THEN
    RETURN;
  END IF;
  -- grantkey's own sessions: the superuser and the admin (owner of grantkey_meta)
  IF session_user::text OPERATOR(pg_catalog.=) (
       SELECT n.nspowner::pg_catalog.regrole::text FROM pg_catalog.pg_namespace n
       WHERE n.nspname OPERATOR(pg_catalog.=) 'grantkey_meta')
     OR (SELECT r.rolsuper FROM pg_catalog.pg_roles r
         WHERE r.rolname OPERATOR(pg_catalog.=) session_user) THEN
    RETURN;
  END IF;
  PERFORM grantkey_meta.refuse_over_quota();
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
       AND (NOT n.nspname::text OPERATOR(pg_catalog.~~) 'pg\\_%'
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
    EXECUTE pg_catalog.format('CREATE OR REPLACE TRIGGER grantkey_quota '
                              'BEFORE INSERT OR UPDATE ON %s '
                              'FOR EACH STATEMENT EXECUTE FUNCTION '
                              'grantkey_meta.quota_before_write()', missing.rel);
  END LOOP;
END
$quota$;

CREATE OR REPLACE FUNCTION grantkey_meta.keep_quota_triggers() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $quota$
BEGIN
  PERFORM grantkey_meta.add_quota_triggers();
END
$quota$;
"""

_FUNCTIONS = ["refuse_over_quota()", "quota_before_write()", "quota_before_ddl()",
              "add_quota_triggers()", "keep_quota_triggers()"]
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
    await su.execute(sql.SQL("ALTER TABLE grantkey_meta.storage_quota OWNER TO {}").format(
        sql.Identifier(row["owner"])))
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
    await su.execute(sql.SQL(
        "GRANT EXECUTE ON FUNCTION grantkey_meta.add_quota_triggers() TO {}").format(
            sql.Identifier(row["owner"])))
    await su.execute("SELECT grantkey_meta.add_quota_triggers()")


async def set_limit(conn: AdminConnection, size: str) -> int | None:
    """Write this database's limit: a PostgreSQL size ('500MB') or '-1' for none. Returns
    the limit in bytes."""
    cur = await conn.execute(
        "UPDATE grantkey_meta.storage_quota SET limit_bytes = CASE WHEN %(size)s::text "
        "OPERATOR(pg_catalog.=) '-1' THEN NULL ELSE pg_catalog.pg_size_bytes(%(size)s::text) "
        "END RETURNING limit_bytes", {"size": size})
    row = await cur.fetchone()
    return None if row is None or row["limit_bytes"] is None else int(row["limit_bytes"])



async def sweep(cluster: Cluster, database: str) -> bool:
    """Give every table of `database` the trigger: for tables made where no event trigger
    fires (`EXPLAIN ANALYZE CREATE TABLE AS …`). Run after each request of a user with a
    quota; waits at most a second for a table a client holds. False if it could not
    (logged; the next request sweeps again)."""
    try:
        async with cluster.user_database(database) as conn:
            await conn.execute("SET LOCAL lock_timeout = '1s'")
            await conn.execute("SELECT grantkey_meta.add_quota_triggers()")
    except (GrantkeyError, psycopg.Error) as error:
        log.info("quota sweep of a user database skipped: %s", type(error).__name__)
        return False
    return True
