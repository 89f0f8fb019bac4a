"""Attacks on the storage quota's CREATE withholding, by a helper attacking its first version
(e20a4a6, which 9 of these broke): a hostile master, a key with schema `create` and the
default public key try to make tables past the quota, to have CREATE given back raised, or
to keep the database withheld or unswept."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Account
from tests.security.quota_support import (
    COPY_LOOP,
    FILL,
    HEADROOM,
    assert_no_create,
    back_under_the_limit,
    over_the_limit,
    schema_acl,
    wait_withholding,
    withholding,
)
from tests.support import table_grants

WITHHELD = "schema privileges cannot change while the database is over its storage quota"


def public_entries(admin_url: str, account: Account, schema: str) -> list[str]:
    return [item for item in schema_acl(admin_url, account, schema) if item.startswith("=")]


def in_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Run each call in its own thread (each makes its own HTTP client); their results."""
    results: list[Any] = [None] * len(calls)

    def runner(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = call()
        except BaseException as error:
            results[i] = error

    threads = [threading.Thread(target=runner, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def get(account: Account, q: str, token: str | None, delay: float = 0.0) -> httpx.Response:
    if delay:
        time.sleep(delay)
    with httpx.Client(timeout=30) as client:
        return account.sql(client, q, token)


# Inside one statement, wait for the sweeper (every second while a request runs) to withhold
# CREATE on public. has_schema_privilege reads the catalog cache, which takes in others'
# changes when a relation is locked for the first time in the transaction: each turn reads
# another system catalog.
WAIT_WITHHELD = (
    "DO $$DECLARE rel regclass; BEGIN "
    "FOR rel IN SELECT c.oid FROM pg_class c WHERE c.relnamespace = 'pg_catalog'::regnamespace "
    "AND c.relkind = 'r' AND has_table_privilege(c.oid, 'SELECT') LOOP "
    "EXECUTE format('SELECT 1 FROM %s LIMIT 0', rel); "
    "EXIT WHEN NOT has_schema_privilege('public', 'CREATE'); PERFORM pg_sleep(0.03); "
    "END LOOP; IF has_schema_privilege('public', 'CREATE') THEN "
    "RAISE EXCEPTION 'never withheld'; END IF; END$$; ")


# 1. A REPEATABLE READ transaction sees the withholding flag as it was at its snapshot.

def test_a_revoke_in_a_repeatable_read_transaction_that_began_before_the_withholding_holds(
    http: httpx.Client, limited: Account, admin_url: str,
    owner_sql: Callable[[Account, str], None],
) -> None:
    """Was a break: the master's REVOKE, in a transaction whose snapshot predates the
    withholding, saw the flag off, ran on the withheld ACL and was undone by the restore.
    The flag is now read outside any snapshot: the REVOKE is refused, and nothing changes."""
    owner_sql(limited, "CREATE SCHEMA extra; GRANT CREATE, USAGE ON SCHEMA extra TO PUBLIC")
    before = schema_acl(admin_url, limited, "extra")
    master = limited.master_token
    done = limited.sql(http, (
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM other; "
        + FILL.format(table="big") + "; "
        + WAIT_WITHHELD +
        "REVOKE CREATE ON SCHEMA extra FROM PUBLIC; COMMIT"), master)
    assert done.status_code == 400, done.text
    assert done.json()["error"] == [WITHHELD]
    back_under_the_limit(http, limited, admin_url)
    assert schema_acl(admin_url, limited, "extra") == before


# 2. Was a break: the sweep was one transaction that waited at most a second for a lock, so
# a client holding a lock it needs made every sweep fail, for as long as it held it. The
# sweep's steps are now separate, and a client session blocking one for over a second is
# ended.

@pytest.mark.parametrize("hold", [
    # a schema's catalog row, updated by a REVOKE that revokes nothing (allowed over the limit)
    "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
    # a table without the quota trigger, locked against CREATE TRIGGER
    "EXPLAIN ANALYZE CREATE TABLE held AS SELECT 1 AS id; COMMIT; BEGIN; "
    "LOCK TABLE held IN ROW EXCLUSIVE MODE",
])
def test_a_request_holding_a_lock_the_sweep_needs_cannot_go_on_copying_tables_to_its_end(
    http: httpx.Client, limited: Account, hold: str,
) -> None:
    """As test_a_request_that_crosses_the_quota_cannot_go_on_copying_tables_to_its_end, with
    a lock taken first in the same request."""
    done = limited.sql(http, "BEGIN; " + hold + "; " + COPY_LOOP.replace(
        "; SELECT current_setting", "; COMMIT; SELECT current_setting"), limited.master_token)
    if done.status_code == 200:
        row = done.json()["rows"][0]
        assert row["refused_at"], f"{row['copies']} copies made over the limit, none refused"
    else:  # its session was ended: what it made in its transaction is gone
        assert done.status_code == 503, done.text
        copies = limited.sql(http, "SELECT count(*) AS n FROM pg_tables "
                                   "WHERE tablename LIKE 'copy%'", limited.master_token)
        assert copies.json()["rows"] == [{"n": 0}], copies.text


def test_overlapping_requests_holding_a_table_keep_the_sweep_failing_and_storage_unlimited(
    limited: Account, admin_url: str,
) -> None:
    """Requests of the master that overlap in time, each holding ROW EXCLUSIVE (they share
    it) on a table made by EXPLAIN ANALYZE, make every sweep fail (it waits a second for
    SHARE ROW EXCLUSIVE to give that table the trigger, then gives up, CREATE withholding
    included): INSERT into that table stores without limit, request after request."""
    master = limited.master_token
    insert = ("INSERT INTO free SELECT g, repeat('x', 1000) "
              "FROM generate_series(1, 2000) AS g")  # 2.2 MB
    # each request holds its lock to 2.6 s after it was received (its time limit is 3 s)
    hold = ("SELECT pg_sleep(2.6 - extract(epoch FROM clock_timestamp() - "
            "statement_timestamp())::float8)")
    first = ("EXPLAIN ANALYZE CREATE TABLE free AS SELECT 1 AS id, 'x'::text AS pad; COMMIT; "
             f"BEGIN; LOCK TABLE free IN ROW EXCLUSIVE MODE; {hold}; COMMIT")
    calls: list[Callable[[], Any]] = [lambda: get(limited, first, master)]
    for k in range(1, 16):
        q = f"BEGIN; LOCK TABLE free IN ROW EXCLUSIVE MODE; {insert}; {hold}; COMMIT"
        calls.append(partial(get, limited, q, master, delay=0.4 * k))
    responses = in_threads(*calls)
    statuses = [getattr(r, "status_code", r) for r in responses]
    with psycopg.connect(admin_url, dbname=limited.user.database) as conn:
        stored = conn.execute("SELECT pg_total_relation_size('public.free')").fetchone()[0]
    # the quota is 3 MB above the database's size: one such request (2.2 MB) nearly crosses it
    written = statuses[1:].count(200)
    assert written <= 3, (
        f"{written} requests wrote {stored / 1e6:.1f} MB into a table with no quota trigger, "
        f"past a quota of {HEADROOM / 1e6:.1f} MB headroom; statuses {statuses}; "
        f"{[getattr(r, 'text', '')[:120] for r in responses if getattr(r, 'status_code', 0) != 200]}")


# 3. DROP INDEX CONCURRENTLY (a DROP: allowed over the limit) commits inside the command:
# the ACLs restored at its start are committed, for everyone, while it waits.

def create_when_restored(ctas: str, seconds: float = 2.5) -> str:
    """One statement: poll (taking in others' catalog changes by locking another relation at
    each turn) until CREATE on public is back, then run `ctas`."""
    return (
        "DO $$DECLARE rel regclass; until timestamptz := clock_timestamp() + interval "
        f"'{seconds} seconds'; BEGIN "
        "FOR rel IN SELECT c.oid FROM pg_class c WHERE c.relnamespace = ANY "
        "('{pg_catalog,information_schema}'::regnamespace[]) AND c.relkind IN ('r', 'v') "
        "AND has_table_privilege(c.oid, 'SELECT') LOOP "
        "EXIT WHEN clock_timestamp() > until; "
        "EXECUTE format('SELECT 1 FROM %s LIMIT 0', rel); "
        "IF has_schema_privilege('public', 'CREATE') THEN "
        f"EXECUTE {ctas!r}; RETURN; END IF; PERFORM pg_sleep(0.004); END LOOP; "
        "RAISE EXCEPTION 'CREATE never came back'; END$$")


def test_a_drop_index_concurrently_does_not_give_create_back_while_it_waits(
    limited: Account, admin_url: str, owner_sql: Callable[[Account, str], None],
    http: httpx.Client,
) -> None:
    owner_sql(limited, "CREATE TABLE small (id int); CREATE INDEX small_id ON small (id)")
    over_the_limit(http, limited, admin_url)
    master = limited.master_token
    holder = "BEGIN; SELECT count(*) FROM small; SELECT pg_sleep(2.5); COMMIT"
    responses = in_threads(
        lambda: get(limited, holder, master),
        lambda: get(limited, "DROP INDEX CONCURRENTLY small_id", master, delay=0.4),
        lambda: get(limited, create_when_restored(
            "EXPLAIN ANALYZE CREATE TABLE sneaky AS SELECT * FROM big"), master, delay=0.2),
    )
    texts = [getattr(r, "text", repr(r))[:200] for r in responses]
    with psycopg.connect(admin_url, dbname=limited.user.database) as conn:
        made = conn.execute("SELECT pg_total_relation_size(to_regclass('public.sneaky'))"
                            ).fetchone()[0]
    # (it holds: while withheld the restore at the command's start writes the catalog, so
    # DROP INDEX CONCURRENTLY is refused as not the first action of its transaction)
    assert made is None, (
        f"over the limit, a table of {made / 1e6:.1f} MB was made where no event trigger "
        f"fires, while a DROP INDEX CONCURRENTLY waited: {texts}")


def test_drop_index_concurrently_still_frees_storage_while_create_is_withheld(
    http: httpx.Client, limited: Account, admin_url: str,
    owner_sql: Callable[[Account, str], None],
) -> None:
    """Minor: a DROP (allowed over the limit to free storage) that works without a quota."""
    owner_sql(limited, "CREATE INDEX big_pad ON big (pad)")
    over_the_limit(http, limited, admin_url)
    dropped = limited.sql(http, "DROP INDEX CONCURRENTLY big_pad", limited.master_token)
    assert dropped.status_code == 200, dropped.text


# 4. The quota's functions pin search_path, not standard_conforming_strings: their SQL is
# parsed, at its first run in a session, with the client's setting. 'pg\_%' then reads as
# 'pg_%', so withhold_create (and add_quota_triggers) skip every schema named pg?…

def test_standard_conforming_strings_off_does_not_spare_a_schema_from_the_withholding(
    http: httpx.Client, limited: Account, admin_url: str,
    owner_sql: Callable[[Account, str], None],
) -> None:
    owner_sql(limited, "CREATE SCHEMA pgx")
    over_the_limit(http, limited, admin_url)
    master = limited.master_token
    copied = limited.sql(http, (
        "SET standard_conforming_strings = off; "
        # a DDL allowed over the limit: restores CREATE at its start, withholds at its end
        "DROP TABLE IF EXISTS nothing; "
        "EXPLAIN ANALYZE CREATE TABLE pgx.copy AS SELECT * FROM big; "
        "SELECT pg_total_relation_size('pgx.copy') AS size"), master)
    assert_no_create(copied)


# 5. withhold_create reads every schema's ACL first, then rewrites them one by one: a change
# committed in between (the sweep waiting on a schema row a client holds) is overwritten
# with the ACL read before it.

WAIT_FOR_A_WAITER = (
    "DO $$BEGIN FOR i IN 1..250 LOOP EXIT WHEN EXISTS (SELECT 1 FROM pg_locks l "
    "WHERE l.locktype = 'transactionid' AND NOT l.granted); PERFORM pg_sleep(0.01); "
    "END LOOP; END$$")


def test_a_revoke_committed_while_the_sweep_withholds_is_not_undone(
    limited: Account, admin_url: str, owner_sql: Callable[[Account, str], None],
) -> None:
    owner_sql(limited, "CREATE SCHEMA y; CREATE SCHEMA x; "
                       "GRANT USAGE, CREATE ON SCHEMA x TO PUBLIC")
    master = limited.master_token
    holder = (
        # holds y's row (a REVOKE that revokes nothing), then crosses the limit
        "BEGIN; REVOKE CREATE ON SCHEMA y FROM PUBLIC; " + FILL.format(table="big") + "; "
        + WAIT_FOR_A_WAITER + "; "
        # the sweep now waits for this transaction: let the other request revoke, then end
        "DO $$BEGIN FOR i IN 1..100 LOOP EXIT WHEN NOT EXISTS (SELECT 1 FROM pg_namespace n, "
        "aclexplode(n.nspacl) a WHERE n.nspname = 'x' AND a.grantee = 0); "
        "PERFORM pg_sleep(0.01); END LOOP; END$$; COMMIT")
    revoker = WAIT_FOR_A_WAITER + "; REVOKE ALL ON SCHEMA x FROM PUBLIC"
    before = public_entries(admin_url, limited, "x")
    responses = in_threads(lambda: get(limited, holder, master),
                           lambda: get(limited, revoker, master, delay=0.1))
    texts = [getattr(r, "text", repr(r))[:200] for r in responses]
    revoked = responses[1]
    assert getattr(revoked, "status_code", None) in (200, 400), texts
    with httpx.Client(timeout=30) as http:
        # (the holder may have been ended by the sweep: its rolled-back fill still takes the
        # disk, so the database is over the limit either way)
        assert limited.sql(http, "SELECT 1", master).status_code == 200
        wait_withholding(admin_url, limited, True)
        time.sleep(1)
        withheld = schema_acl(admin_url, limited, "x")
        back_under_the_limit(http, limited, admin_url)
        made = limited.sql(http, "CREATE TABLE x.t (id int)")  # the default public key
    restored = schema_acl(admin_url, limited, "x")
    expected = [] if revoked.status_code == 200 else before  # (400: refused, nothing changed)
    assert public_entries(admin_url, limited, "x") == expected, (
        f"the master's REVOKE ALL ON SCHEMA x FROM PUBLIC answered {revoked.status_code}: "
        f"over the limit x's ACL read {withheld}, back under it {restored}; the default "
        f"public key's CREATE TABLE x.t answered {made.status_code}; {texts}")


def test_a_key_created_while_the_sweep_withholds_is_created(
    limited: Account, admin_url: str, owner_sql: Callable[[Account, str], None], server: Any,
) -> None:
    """Key creation grants CREATE on public to a privilege role while the sweep, holding
    public's row (withheld, not committed), waits on another schema's row."""
    owner_sql(limited, "CREATE SCHEMA y")
    master = limited.master_token
    holder = (
        "BEGIN; REVOKE CREATE ON SCHEMA y FROM PUBLIC; " + FILL.format(table="big") + "; "
        # the sweep waits for this transaction; end once the key's GRANT waits for the sweep
        "DO $$BEGIN FOR i IN 1..250 LOOP EXIT WHEN (SELECT count(*) FROM pg_locks l "
        "WHERE l.locktype = 'transactionid' AND NOT l.granted) >= 2; PERFORM pg_sleep(0.01); "
        "END LOOP; END$$; COMMIT")

    def create_key() -> httpx.Response:
        with psycopg.connect(admin_url, dbname=limited.user.database, autocommit=True) as conn:
            deadline = time.monotonic() + 2.5
            while not conn.execute("SELECT 1 FROM pg_locks WHERE locktype = 'transactionid' "
                                   "AND NOT granted").fetchall():
                assert time.monotonic() < deadline, "the sweep never waited"
                time.sleep(0.01)
        with httpx.Client(timeout=30) as client:
            return client.post(limited.keys_url, params=limited.master(), json={
                "name": "maker", "grants": table_grants([], create_schemas=("public",))})

    held, created = in_threads(lambda: get(limited, holder, master), create_key)
    assert getattr(held, "status_code", held) in (200, 503), held  # 503: the sweep ended it
    logged = [line for line in server.log_path.read_text().splitlines()[-400:]
              if "concurrently" in line]
    assert getattr(created, "status_code", created) in (200, 201), (
        getattr(created, "text", created), logged[-3:])


# 6. Any DDL while CREATE is withheld rewrites every withheld schema's row in the client's own
# transaction (restore, then withhold): the client then holds those rows to its end.

def test_the_default_public_key_cannot_block_the_masters_drop_and_key_creation(
    http: httpx.Client, limited: Account, admin_url: str,
) -> None:
    """Over the limit the master frees storage with DROP TABLE and creates a key, while the
    default public key runs `DROP TABLE IF EXISTS nothing` (a DDL, so it restores and
    withholds CREATE: every withheld schema row is then its own) in transactions that last
    to its time limit, three times a second."""
    over_the_limit(http, limited, admin_url)
    hold = "BEGIN; DROP TABLE IF EXISTS nothing; SELECT pg_sleep(2.6); COMMIT"
    calls: list[Callable[[], Any]] = [
        partial(get, limited, hold, None, delay=0.3 * k) for k in range(20)]
    calls.append(lambda: get(limited, "DROP TABLE other", limited.master_token, delay=1.5))

    def create_key() -> httpx.Response:
        time.sleep(2.0)
        with httpx.Client(timeout=30) as client:
            return client.post(limited.keys_url, params=limited.master(), json={
                "name": "late", "grants": table_grants([], create_schemas=("public",))})

    calls.append(create_key)
    responses = in_threads(*calls)
    anonymous = [getattr(r, "status_code", r) for r in responses[:-2]]
    dropped, created = responses[-2:]
    assert (dropped.status_code, created.status_code) == (200, 201), (
        f"the master's DROP TABLE: {dropped.status_code} {dropped.text[:120]}; key creation: "
        f"{created.status_code} {created.text[:120]}; the default public key's requests: "
        f"{anonymous}")


# 7. Other ways to make a table while CREATE is withheld (these hold).

@pytest.mark.parametrize("attempt", [
    "PREPARE p AS SELECT * FROM big; EXPLAIN ANALYZE CREATE TABLE c AS EXECUTE p",
    "SELECT made()",  # SECURITY DEFINER, the master's own (made under the limit)
    "DELETE FROM other",  # a trigger of the master's on DELETE (made under the limit)
    "BEGIN; SAVEPOINT s; DROP TABLE big, nothing; ROLLBACK TO s; "
    "EXPLAIN ANALYZE CREATE TABLE c AS SELECT 1 AS id; COMMIT",
    "DO $$BEGIN BEGIN DROP TABLE nothing; EXCEPTION WHEN others THEN NULL; END; "
    "EXECUTE 'EXPLAIN ANALYZE CREATE TABLE c AS SELECT 1 AS id'; END$$",
    "REVOKE ALL ON big FROM PUBLIC; EXPLAIN ANALYZE CREATE TABLE c AS SELECT 1 AS id",
    "EXPLAIN ANALYZE CREATE TABLE c AS SELECT 1 AS id FROM (SELECT count(*) FROM "
    "(SELECT made()) m) n",
    "CREATE SCHEMA s AUTHORIZATION CURRENT_USER CREATE TABLE c (id int)",
    "ALTER TABLE other SET SCHEMA extra",
    "BEGIN ISOLATION LEVEL SERIALIZABLE; DROP TABLE IF EXISTS nothing; "
    "EXPLAIN ANALYZE CREATE TABLE c AS SELECT 1 AS id; COMMIT",
])
def test_past_the_quota_no_other_way_makes_a_table(
    http: httpx.Client, limited: Account, admin_url: str,
    owner_sql: Callable[[Account, str], None], attempt: str,
) -> None:
    owner_sql(limited, (
        "CREATE SCHEMA extra; "
        "CREATE FUNCTION made() RETURNS int LANGUAGE plpgsql SECURITY DEFINER AS "
        "$$BEGIN EXECUTE 'EXPLAIN ANALYZE CREATE TABLE public.c AS SELECT 1 AS id'; "
        "RETURN 1; END$$; "
        "CREATE FUNCTION on_delete() RETURNS trigger LANGUAGE plpgsql AS "
        "$$BEGIN PERFORM made(); RETURN NULL; END$$; "
        "CREATE TRIGGER a_on_delete BEFORE DELETE ON other FOR EACH STATEMENT "
        "EXECUTE FUNCTION on_delete()"))
    over_the_limit(http, limited, admin_url)
    response = limited.sql(http, attempt, limited.master_token)
    assert response.status_code in (400, 403), response.text
    with psycopg.connect(admin_url, dbname=limited.user.database) as conn:
        made = conn.execute("SELECT array_agg(c.oid::regclass::text) FROM pg_class c "
                            "WHERE c.relname = 'c' OR c.relnamespace = "
                            "to_regnamespace('s')").fetchone()[0]
        moved = conn.execute("SELECT to_regclass('extra.other')").fetchone()[0]
    assert made is None and moved is None, (made, moved)
    assert withholding(admin_url, limited)


def test_planted_functions_and_operators_do_not_change_the_restored_acls(
    http: httpx.Client, limited: Account, admin_url: str,
    owner_sql: Callable[[Account, str], None],
) -> None:
    owner_sql(limited, (
        "CREATE SCHEMA extra; GRANT CREATE ON SCHEMA extra TO PUBLIC; "
        "CREATE FUNCTION public.quote_ident(text) RETURNS text LANGUAGE sql AS $$SELECT ''$$; "
        "CREATE FUNCTION public.format(text, VARIADIC text[]) RETURNS text LANGUAGE sql "
        "AS $$SELECT '=UC/' || current_user$$; "
        "CREATE FUNCTION public.aclexplode(aclitem[]) RETURNS TABLE (grantor oid, grantee oid, "
        "privilege_type text, is_grantable boolean) LANGUAGE sql "
        "AS $$SELECT 10::oid, 0::oid, 'CREATE', true$$; "
        "CREATE FUNCTION public.neq(text, text) RETURNS boolean LANGUAGE sql AS $$SELECT true$$; "
        "CREATE OPERATOR public.<> (LEFTARG = text, RIGHTARG = text, FUNCTION = public.neq)"))
    before = {s: schema_acl(admin_url, limited, s) for s in ("public", "extra")}
    over_the_limit(http, limited, admin_url)
    ran = limited.sql(http, "SET search_path = public, pg_catalog; DROP TABLE IF EXISTS n; "
                            "REVOKE ALL ON big FROM nobody_at_all", limited.master_token)
    assert ran.status_code in (200, 400), ran.text
    assert not [i for s in ("public", "extra") for i in schema_acl(admin_url, limited, s)
                if "C" in i.split("=")[-1].split("/")[0]]
    back_under_the_limit(http, limited, admin_url)
    assert {s: schema_acl(admin_url, limited, s) for s in before} == before
