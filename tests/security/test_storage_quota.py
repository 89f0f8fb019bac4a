"""The per-user storage quota (GRANTKEY_STORAGE_QUOTA, off by default): past it, writes are
refused with CARTO's `DB Quota exceeded`, whoever writes and however, and no client SQL (the
master's included) can lift it. Enforced by PostgreSQL: a superuser's statement trigger on
every table, kept there by an event trigger, and a refusal of the commands that fill storage
without an INSERT."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import httpx
import psycopg
import pytest

from grantkey.db.storage_quota import MEASURE_SECONDS
from grantkey.errors import SetupError
from grantkey.services.container import Services
from grantkey.services.upgrade import apply_storage_quotas
from grantkey.settings import Settings
from tests.conftest import Account, KeyHandle
from tests.security.quota_support import FILL, assert_refused, fill, set_quota
from tests.support import table_grants


def test_writes_past_the_quota_are_refused_with_carto_message_until_data_is_deleted(
    http: httpx.Client, limited: Account,
) -> None:
    master = limited.master_token
    fill(http, limited, master)
    for statement in ["INSERT INTO big VALUES (1, 'a')", "UPDATE big SET pad = 'b' WHERE id = 1",
                      "INSERT INTO other VALUES (1, 'a')",
                      "INSERT INTO big VALUES (1, 'a') ON CONFLICT DO NOTHING",
                      "MERGE INTO big USING (SELECT 1 AS id) s ON big.id = s.id "
                      "WHEN NOT MATCHED THEN INSERT VALUES (s.id, 'm')"]:
        assert_refused(limited.sql(http, statement, master))
    deleted = limited.sql(http, "DELETE FROM big WHERE id > 10", master)
    assert deleted.status_code == 200, deleted.text
    assert limited.sql(http, "TRUNCATE big", master).status_code == 200
    written = limited.sql(http, "INSERT INTO big VALUES (1, 'a')", master)
    assert written.status_code == 200, written.text


def test_the_commands_that_fill_storage_without_insert_are_refused_past_the_quota(
    http: httpx.Client, limited: Account,
) -> None:
    master = limited.master_token
    fill(http, limited, master)
    for statement in ["CREATE TABLE copy AS SELECT * FROM big", "SELECT * INTO copy2 FROM big",
                      "CREATE MATERIALIZED VIEW m AS SELECT * FROM big",
                      "CREATE INDEX big_pad ON big (pad)",
                      "ALTER TABLE big ALTER COLUMN pad TYPE varchar(2000)"]:
        assert_refused(limited.sql(http, statement, master))
    version = limited.sql(http, "SELECT current_setting('server_version_num')::int AS v", master)
    if version.json()["rows"][0]["v"] >= 170000:  # REINDEX reaches event triggers from 17
        assert_refused(limited.sql(http, "REINDEX TABLE big", master))
    # reading and deleting stay open
    assert limited.sql(http, "SELECT count(*) FROM big", master).status_code == 200
    assert limited.sql(http, "DROP TABLE big", master).status_code == 200


def test_every_kind_of_client_is_held_to_the_quota(
    http: httpx.Client, limited: Account, owner_sql: Callable[[Account, str], None],
    make_key: Callable[..., KeyHandle],
) -> None:
    owner_sql(limited, "GRANT SELECT ON big TO PUBLIC")
    writer = make_key(limited, "writer", table_grants([("public", "other", ["insert"])]))
    maker = make_key(limited, "maker", table_grants([("public", "big", ["select"])],
                                                    create_schemas=("public",)))
    # the default public key fills a temporary table past the quota (and past temp_buffers:
    # what stays in the session's memory is not on disk); the table goes with the request
    temporary = "CREATE TEMP TABLE t (id int, pad text); " + FILL.format(table="t").replace(
        "5000", "15000")
    wait = f"SELECT pg_sleep({MEASURE_SECONDS + 0.1})"
    assert_refused(limited.sql(http, f"{temporary}; {wait}; INSERT INTO t VALUES (1)"))
    assert limited.sql(http, temporary).status_code == 200
    fill(http, limited, limited.master_token)
    assert_refused(limited.sql(http, "INSERT INTO other VALUES (1)", writer.token))
    assert_refused(limited.sql(http, "CREATE TABLE mine (id int); INSERT INTO mine VALUES (1)",
                               maker.token))
    assert_refused(limited.sql(http, "CREATE TABLE mine2 AS SELECT 1 AS id", maker.token))
    assert_refused(limited.sql(http, "CREATE TEMP TABLE t2 (id int); INSERT INTO t2 VALUES (1)"))


LIFTS = [
    "ALTER TABLE big DISABLE TRIGGER ALL",
    "ALTER TABLE big DISABLE TRIGGER USER",
    "ALTER TABLE big DISABLE TRIGGER grantkey_quota",
    "ALTER TABLE big ENABLE REPLICA TRIGGER grantkey_quota",
    "DROP TRIGGER grantkey_quota ON big",
    "ALTER TRIGGER grantkey_quota ON big RENAME TO gone; DROP TRIGGER gone ON big",
    "CREATE SCHEMA elsewhere; CREATE TABLE elsewhere.big (id int, pad text); "
    "SET search_path = elsewhere",
    "CREATE TABLE big2 (LIKE big); DROP TABLE big; ALTER TABLE big2 RENAME TO big",
    "CREATE TABLE parts (id int, pad text) PARTITION BY RANGE (id); "
    "DROP TABLE big; CREATE TABLE big PARTITION OF parts FOR VALUES FROM (0) TO (10)",
    "CREATE TABLE kid () INHERITS (big); ALTER TABLE kid NO INHERIT big; DROP TABLE big; "
    "ALTER TABLE kid RENAME TO big",
    "CREATE UNLOGGED TABLE u (id int, pad text); DROP TABLE big; ALTER TABLE u RENAME TO big",
    "ALTER TABLE big RENAME TO old; CREATE VIEW big AS SELECT * FROM old",
    "CREATE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql AS "
    "$$BEGIN RETURN NULL; END$$; CREATE OR REPLACE TRIGGER grantkey_quota BEFORE INSERT OR "
    "UPDATE ON big FOR EACH STATEMENT EXECUTE FUNCTION public.noop()",
    "CREATE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql AS "
    "$$BEGIN RETURN NULL; END$$; CREATE OR REPLACE TRIGGER grantkey_quota AFTER DELETE "
    "ON big FOR EACH STATEMENT EXECUTE FUNCTION public.noop()",
]


@pytest.mark.parametrize("lift", LIFTS)
def test_the_master_cannot_lift_the_quota_by_changing_its_tables(
    http: httpx.Client, limited: Account, lift: str,
) -> None:
    """Made while under the quota (over it, ALTER TABLE is refused anyway)."""
    master = limited.master_token
    lifted = limited.sql(http, lift, master)
    assert lifted.status_code == 200, lifted.text
    fill(http, limited, master, table="other")
    assert_refused(limited.sql(http, "INSERT INTO big VALUES (1, 'a')", master))


SETTINGS_LIFTS = [
    ("UPDATE grantkey_meta.storage_quota SET limit_bytes = NULL", "permission denied"),
    ("SET session_replication_role = replica", "permission denied"),
    ("ALTER EVENT TRIGGER grantkey_quota_keep DISABLE", "must be owner"),
    ("DROP EVENT TRIGGER grantkey_quota_ddl", "must be owner"),
    ("CREATE OR REPLACE FUNCTION grantkey_meta.refuse_over_quota() RETURNS void "
     "LANGUAGE sql AS ''", "permission denied"),
    ("ALTER FUNCTION grantkey_meta.quota_before_write() RENAME TO x", "permission denied"),
]


@pytest.mark.parametrize(("lift", "error"), SETTINGS_LIFTS)
def test_the_master_cannot_lift_the_quota_by_changing_grantkeys_objects(
    http: httpx.Client, limited: Account, lift: str, error: str,
) -> None:
    master = limited.master_token
    response = limited.sql(http, lift, master)
    assert response.status_code in (400, 403) and error in response.text, response.text
    fill(http, limited, master)
    assert limited.sql(http, lift, master).status_code in (400, 403)  # over it too
    assert_refused(limited.sql(http, "INSERT INTO big VALUES (1, 'a')", master))


def test_a_key_cannot_lift_the_quota_on_the_table_it_owns(
    http: httpx.Client, limited: Account, make_key: Callable[..., KeyHandle],
) -> None:
    maker = make_key(limited, "maker", table_grants([], create_schemas=("public",)))
    made = limited.sql(http, "CREATE TABLE mine (id int, pad text)", maker.token)
    assert made.status_code == 200, made.text
    disabled = limited.sql(http, "ALTER TABLE mine DISABLE TRIGGER ALL", maker.token)
    assert disabled.status_code == 200, disabled.text
    dropped = limited.sql(http, "DROP TRIGGER grantkey_quota ON mine", maker.token)
    assert dropped.status_code == 403, dropped.text  # code is the master's business
    fill(http, limited, maker.token, table="mine")
    assert_refused(limited.sql(http, "INSERT INTO mine VALUES (1)", maker.token))


def test_planted_functions_do_not_change_how_the_quota_measures(
    http: httpx.Client, limited: Account,
) -> None:
    """The quota's functions pin their search_path: a master's `public.pg_database_size`
    or `>` operator is never what they call."""
    master = limited.master_token
    planted = limited.sql(http, (
        "CREATE FUNCTION public.pg_database_size(name) RETURNS bigint LANGUAGE sql AS 'SELECT 0::bigint';"
        "CREATE FUNCTION public.pg_database_size(oid) RETURNS bigint LANGUAGE sql AS 'SELECT 0::bigint';"
        "CREATE FUNCTION public.gt(bigint, bigint) RETURNS boolean LANGUAGE sql AS 'SELECT false';"
        "CREATE OPERATOR public.> (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = public.gt)"),
        master)
    assert planted.status_code == 200, planted.text
    fill(http, limited, master)
    assert_refused(limited.sql(http, "SET search_path = public, pg_catalog; "
                                     "INSERT INTO big VALUES (1, 'a')", master))


def test_the_quota_is_off_by_default_and_a_table_keeps_its_trigger(
    http: httpx.Client, account: Account, admin_url: str,
    owner_sql: Callable[[Account, str], None],
) -> None:
    assert Settings.from_env({}).storage_quota == "-1"
    owner_sql(account, "CREATE TABLE big (id int, pad text)")
    with psycopg.connect(admin_url, dbname=account.user.database) as conn:
        assert conn.execute("SELECT limit_bytes FROM grantkey_meta.storage_quota").fetchall() == [
            (None,)]
        triggers = conn.execute("SELECT tgenabled FROM pg_trigger WHERE tgname = 'grantkey_quota' "
                                "AND tgrelid = 'public.big'::regclass").fetchall()
        assert triggers == [("O",)]
    for _ in range(3):
        fill(http, account, account.master_token)


@pytest.mark.parametrize("value", ["0", "0MB", "lots", "5 GB", "-2"])
def test_a_quota_setting_that_is_not_a_positive_size_stops_the_start(value: str) -> None:
    with pytest.raises(SetupError, match="GRANTKEY_STORAGE_QUOTA"):
        Settings.from_env({"GRANTKEY_STORAGE_QUOTA": value})


def test_the_setting_reaches_new_and_existing_users_and_can_be_lifted_again(
    settings: Settings, account: Account, admin_url: str,
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    """`users create` gives a new user GRANTKEY_STORAGE_QUOTA; `serve` applies it at start
    to every user whose database has another (and -1 lifts it)."""

    def limit(database: str) -> Any:
        with psycopg.connect(admin_url, dbname=database) as conn:
            row = conn.execute("SELECT limit_bytes FROM grantkey_meta.storage_quota").fetchone()
            return None if row is None else row[0]

    async def with_settings(quota: str, step: Callable[[Services], Awaitable[Any]]) -> Any:
        services = Services(replace(settings, storage_quota=quota), admin_url)
        await services.open(migrate=False)
        try:
            return await step(services)
        finally:
            await services.close()

    made = run(with_settings("5MB", lambda s: s.users.create("quota-new-user")))
    try:
        assert limit(made.user.database) == 5 * 1024 * 1024
        assert limit(account.user.database) is None
        changed = run(with_settings("7MB", lambda s: apply_storage_quotas(s.cluster, "7MB")))
        assert changed[account.user.username] == "7MB" and changed["quota-new-user"] == "7MB"
        assert limit(made.user.database) == limit(account.user.database) == 7 * 1024 * 1024
        again = run(with_settings("7MB", lambda s: apply_storage_quotas(s.cluster, "7MB")))
        assert again == {}, "a start with nothing to change touches no user database"
    finally:
        lifted = run(with_settings("-1", lambda s: apply_storage_quotas(s.cluster, "-1")))
        run(with_settings("-1", lambda s: s.users.delete("quota-new-user")))
    assert limit(account.user.database) is None and account.user.username in lifted


# Found by attacking the first version (see docs/security.md): tables PostgreSQL makes
# without firing any event trigger, catalogs as storage, rewrites under other tags, a
# keeper that recursed, read-only transactions.

BLOB = "(SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, 40000) g)"


@pytest.mark.parametrize("create", [
    "EXPLAIN ANALYZE CREATE TABLE sneaky AS SELECT 1 AS id, 'x'::text AS pad",
    "EXPLAIN ANALYZE SELECT 1 AS id, 'x'::text AS pad INTO sneaky",
    "DO $$BEGIN EXECUTE 'EXPLAIN ANALYZE CREATE TABLE sneaky AS "
    "SELECT 1 AS id, ''x''::text AS pad'; END$$",
])
def test_a_table_made_where_no_event_trigger_fires_gets_the_quota_after_the_request(
    http: httpx.Client, limited: Account, create: str,
) -> None:
    master = limited.master_token
    made = limited.sql(http, create, master)
    assert made.status_code == 200, made.text
    fill(http, limited, master)
    assert_refused(limited.sql(http, "INSERT INTO sneaky VALUES (1, 'a')", master))


def test_a_key_cannot_keep_a_table_without_the_quota_through_explain(
    http: httpx.Client, limited: Account, make_key: Callable[..., KeyHandle],
) -> None:
    maker = make_key(limited, "maker", table_grants([], create_schemas=("public",)))
    made = limited.sql(http, "EXPLAIN ANALYZE CREATE TABLE mine AS "
                             "SELECT 1 AS id, 'x'::text AS pad", maker.token)
    assert made.status_code == 200, made.text
    fill(http, limited, maker.token, table="mine")
    assert_refused(limited.sql(http, "INSERT INTO mine VALUES (1, 'a')", maker.token))


def test_hundreds_of_tables_without_the_trigger_break_no_ddl_and_no_key_creation(
    http: httpx.Client, limited: Account, make_key: Callable[..., KeyHandle], admin_url: str,
) -> None:
    """The keeper makes the triggers with event triggers off: no recursion, no N² work.
    (400 tables grow the catalogs by MBs: the limit is moved out of the way, so that only
    the keeper, not the quota, could refuse the DDL that follows.)"""
    set_quota(admin_url, limited, 200 * 1024 * 1024)
    master = limited.master_token
    made = limited.sql(http, "CREATE SCHEMA many; DO $$BEGIN FOR i IN 1..400 LOOP EXECUTE "
                             "format('EXPLAIN ANALYZE CREATE TABLE many.t%s AS SELECT 1 AS id',"
                             " i); END LOOP; END$$", master)
    assert made.status_code == 200, made.text
    ddl = limited.sql(http, "CREATE TABLE after (id int)", master)
    assert ddl.status_code == 200, ddl.text
    make_key(limited, "reader", table_grants([("public", "big", ["select"])]))
    counted = limited.sql(http, "SELECT count(*) AS n FROM pg_trigger t JOIN pg_class c ON "
                                "c.oid = t.tgrelid JOIN pg_namespace s ON s.oid = c.relnamespace "
                                "WHERE s.nspname = 'many' AND t.tgname = 'grantkey_quota'", master)
    assert counted.json()["rows"] == [{"n": 400}]


def test_the_quota_installs_on_a_database_with_hundreds_of_older_tables(
    account: Account, admin_url: str,
) -> None:
    with psycopg.connect(admin_url, dbname=account.user.database, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")  # the keeper off
            conn.execute("CREATE SCHEMA legacy; DO $$BEGIN FOR i IN 1..400 LOOP EXECUTE "
                         "format('CREATE TABLE legacy.t%s (a int)', i); END LOOP; END$$")
        conn.execute("SELECT grantkey_meta.add_quota_triggers()")
        count = conn.execute(
            "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'legacy' AND t.tgname = 'grantkey_quota'").fetchone()
        assert count == (400,)
        conn.execute("DROP SCHEMA legacy CASCADE")


CATALOG_FILLS = [
    f"DO $$BEGIN EXECUTE format('COMMENT ON TABLE big IS %L', {BLOB}); END$$",
    "DO $$BEGIN EXECUTE format('CREATE FUNCTION public.blob() RETURNS text LANGUAGE sql "
    f"AS %L', 'SELECT ' || quote_literal({BLOB})); END$$",
    f"DO $$BEGIN EXECUTE format('CREATE VIEW blob AS SELECT %L::text AS d', {BLOB}); END$$",
    f"DO $$BEGIN EXECUTE format('CREATE TABLE blob (d text DEFAULT %L)', {BLOB}); END$$",
    "CREATE SEQUENCE s1",
]


@pytest.mark.parametrize("statement", CATALOG_FILLS)
def test_the_catalogs_cannot_grow_the_database_past_the_quota(
    http: httpx.Client, limited: Account, statement: str,
) -> None:
    master = limited.master_token
    fill(http, limited, master)
    assert_refused(limited.sql(http, statement, master))


def test_a_key_cannot_grow_the_catalogs_past_the_quota(
    http: httpx.Client, limited: Account, make_key: Callable[..., KeyHandle],
) -> None:
    maker = make_key(limited, "maker", table_grants([], create_schemas=("public",)))
    fill(http, limited, limited.master_token)
    assert_refused(limited.sql(http, CATALOG_FILLS[2], maker.token))


def test_rewrites_under_other_tags_are_refused_past_the_quota(
    http: httpx.Client, limited: Account, owner_sql: Callable[[Account, str], None],
) -> None:
    owner_sql(limited, "CREATE TYPE ty AS (id int, c varchar(10)); CREATE TABLE typed OF ty; "
                       "INSERT INTO typed SELECT g, 'a' FROM generate_series(1, 2000) g; "
                       "CREATE INDEX big_id ON big (id)")
    master = limited.master_token
    fill(http, limited, master)
    assert_refused(limited.sql(
        http, "ALTER TYPE ty ALTER ATTRIBUTE c TYPE char(100000) CASCADE", master))
    assert_refused(limited.sql(http, "ALTER INDEX big_id SET (fillfactor = 10)", master))
    dropped = limited.sql(http, "DROP INDEX big_id; REVOKE ALL ON big FROM PUBLIC", master)
    assert dropped.status_code == 200, dropped.text  # what frees storage stays open


def test_a_read_only_transaction_can_still_write_its_temporary_tables(
    http: httpx.Client, limited: Account,
) -> None:
    time.sleep(MEASURE_SECONDS + 0.1)  # the last measure is stale: this one measures
    response = limited.sql(http, "CREATE TEMP TABLE x (a int); BEGIN READ ONLY; "
                                 "INSERT INTO x VALUES (1); COMMIT")
    assert response.status_code == 200, response.text
