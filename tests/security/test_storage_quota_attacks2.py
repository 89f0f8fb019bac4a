"""Second round of attacks on the storage quota's CREATE withholding (bb5beea): a hostile
master, a key with schema `create` and the default public key try to store past the quota,
to have CREATE given back raised or kept withheld, to turn the sweep's watchdog against
sessions it should spare, and to make key creation fail.

At bb5beea (a helper's second round): A (both), C, D, E and G[True] failed (breaks, now
fixed); B, F and G[False] passed (held). A failed at 1732c37 too (it needs no quota)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Account
from tests.security.quota_support import (
    back_under_the_limit,
    over_the_limit,
    schema_acl,
    wait_withholding,
    withholding,
)
from tests.security.test_storage_quota_attacks import WAIT_FOR_A_WAITER, get, in_threads
from tests.support import table_grants


def state(admin_url: str, account: Account) -> tuple[int, list[Any]]:
    with psycopg.connect(admin_url, dbname=account.user.database) as conn:
        flag = conn.execute("SELECT last_value FROM grantkey_meta.create_withheld_flag"
                            ).fetchone()[0]
        rows = conn.execute("SELECT schema_oid::regnamespace::text, grantor::regrole::text, "
                            "grantee, grantable FROM grantkey_meta.create_withheld").fetchall()
    return flag, rows


# A. Under the limit, any client with USAGE on a schema can hold its catalog row: a REVOKE
# that revokes nothing (a non-owner's gets a warning, and still rewrites the row). Key
# creation's GRANT on that schema waits for it, then meets a row updated meanwhile
# (`tuple concurrently updated`: 500). Was a break at bb5beea and at 1732c37 (not from the
# quota's diff: the default public key has USAGE on public by default); the grant is now
# made again on the new row.

@pytest.mark.parametrize("who", ["master", "public"])
def test_a_client_holding_a_schema_row_does_not_make_key_creation_fail(
    limited: Account, admin_url: str, who: str, server: Any,
) -> None:
    token = limited.master_token if who == "master" else None
    hold = "BEGIN; REVOKE CREATE ON SCHEMA public FROM PUBLIC; SELECT pg_sleep(2); COMMIT"

    def create_key() -> httpx.Response:
        time.sleep(0.6)
        with httpx.Client(timeout=30) as client:
            return client.post(limited.keys_url, params=limited.master(), json={
                "name": "maker", "grants": table_grants([], create_schemas=("public",))})

    held, created = in_threads(lambda: get(limited, hold, token), create_key)
    # (503: the sweep, waiting for the key creation that waits for the holder, ended it)
    assert getattr(held, "status_code", held) in (200, 503), getattr(held, "text", held)
    logged = [line[:300] for line in server.log_path.read_text().splitlines()[-400:]
              if "concurrently" in line or "Error" in line]
    assert getattr(created, "status_code", created) in (200, 201), (
        getattr(created, "status_code", created), getattr(created, "text", created)[:300],
        logged[-4:])


# B. PREPARE TRANSACTION would hold a schema row past the session (no pid to end). (held:
# max_prepared_transactions is 0)

def test_a_prepared_transaction_cannot_hold_a_schema_row_past_its_session(
    http: httpx.Client, limited: Account, admin_url: str,
) -> None:
    held = limited.sql(http, "BEGIN; REVOKE CREATE ON SCHEMA public FROM PUBLIC; "
                             "PREPARE TRANSACTION 'gk_hold'", limited.master_token)
    with psycopg.connect(admin_url, dbname=limited.user.database, autocommit=True) as conn:
        prepared = conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall()
        for (gid,) in prepared:
            conn.execute(f"ROLLBACK PREPARED '{gid}'")
    assert prepared == [], (held.status_code, held.text[:200])


# C. The restore deletes every record of what was withheld, also those a client's DDL
# committed while the restore ran (CREATE SCHEMA, under the limit again, while the flag is
# still set: its own CREATE is withheld in its transaction). DROP SCHEMA of a withheld
# schema makes the restore wait on that transaction. Was a break: y is left with its CREATE
# withheld, no record of it and the flag cleared: never given back.

def test_a_schema_made_while_the_restore_runs_gets_its_create_back(
    http: httpx.Client, limited: Account, admin_url: str,
    owner_sql: Callable[[Account, str], None],
) -> None:
    owner_sql(limited, "CREATE SCHEMA extra")
    over_the_limit(http, limited, admin_url)
    done = limited.sql(http, (
        "BEGIN; TRUNCATE big; COMMIT; BEGIN; DROP SCHEMA extra; CREATE SCHEMA y; "
        + WAIT_FOR_A_WAITER + "; COMMIT"), limited.master_token)
    assert done.status_code == 200, done.text
    wait_withholding(admin_url, limited, False)
    time.sleep(1.5)
    flag, rows = state(admin_url, limited)
    acl = schema_acl(admin_url, limited, "y")
    made = limited.sql(http, "CREATE TABLE y.t (id int)", limited.master_token)
    assert made.status_code == 200, (
        f"under the limit, the master cannot create in its own schema y: {made.text[:150]}; "
        f"y's ACL {acl}; flag {flag}; withheld records {rows}")


# D. Every client DDL gives the quota trigger to every table that lacks it (in the client's
# own transaction): the master's CREATE TABLE waits for a table a key made by EXPLAIN
# ANALYZE and holds. The sweep, queued behind it, counts the waiting master among its
# blockers (pg_blocking_pids): the watchdog ends the master's session, that held nothing.
# Was a break: the master's CREATE TABLE answers 503 (session ended).

def test_the_watchdog_does_not_end_the_masters_ddl_that_only_waits(
    limited: Account, admin_url: str, make_key: Callable[..., Any],
) -> None:
    maker = make_key(limited, "maker", table_grants([], create_schemas=("public",)))
    hold = ("BEGIN; EXPLAIN ANALYZE CREATE TABLE kt AS SELECT 1 AS id; COMMIT; "
            "BEGIN; LOCK TABLE kt IN ROW EXCLUSIVE MODE; SELECT pg_sleep(2.5); COMMIT")
    held, made = in_threads(
        lambda: get(limited, hold, maker.token),
        lambda: get(limited, "CREATE TABLE mine (id int)", limited.master_token, delay=0.3))
    texts = [getattr(r, "status_code", r) for r in (held, made)], getattr(made, "text", "")[:200]
    assert getattr(made, "status_code", made) == 200, (
        f"the master's CREATE TABLE, which only waited for the key's table, was ended: {texts}")


# E. withhold_create and restore_create write pg_namespace.nspacl directly: pg_shdepend is
# not told. A role whose only entry on a schema was CREATE leaves the withheld ACL, but its
# ACL dependency stays: DROP OWNED BY it finds nothing to revoke (the ACL has no entry of
# its), the dependency is not removed, and DROP ROLE then fails. Was a break: the deletion
# answers 204, the role stays ("left for a later retry: ... some objects depend on it"), and
# the restore gives the deleted key's role its CREATE back.

def test_a_key_granted_only_create_on_a_schema_can_be_deleted_while_create_is_withheld(
    http: httpx.Client, limited: Account, admin_url: str,
    owner_sql: Callable[[Account, str], None], make_key: Callable[..., Any], server: Any,
) -> None:
    doomed = make_key(limited, "doomed", table_grants([("public", "big", ["select"])]))
    owner_sql(limited, "CREATE SCHEMA extra")
    granted = limited.sql(http, f'GRANT CREATE ON SCHEMA extra TO "{doomed.role}"',
                          limited.master_token)
    assert granted.status_code == 200, granted.text
    over_the_limit(http, limited, admin_url)
    deleted = http.delete(f"{limited.keys_url}/doomed", params={"api_key": limited.master_token})
    deadline = time.monotonic() + 8
    while True:
        with psycopg.connect(admin_url, dbname=limited.user.database) as conn:
            left = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s",
                                [doomed.role]).fetchone()[0]
            deps = conn.execute(
                "SELECT count(*) FROM pg_shdepend WHERE refobjid = "
                "(SELECT oid FROM pg_roles WHERE rolname = %s)", [doomed.role]).fetchone()[0]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    back_under_the_limit(http, limited, admin_url)
    acl = schema_acl(admin_url, limited, "extra")
    time.sleep(5)
    with psycopg.connect(admin_url, dbname=limited.user.database) as conn:
        later = conn.execute("SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = %s",
                             [doomed.role]).fetchall()
    logged = [line[:240] for line in server.log_path.read_text().splitlines()[-600:]
              if "depend" in line or "drop" in line.lower()]
    assert deleted.status_code in (200, 204) and not left, (
        f"deleting the key answered {deleted.status_code} {deleted.text[:200]}; its role is "
        f"{'still there' if left else 'gone'} ({deps} shared dependencies); back under the "
        f"limit extra's ACL {acl}; 5 s later the role: {later}; log: {logged[-4:]}")


# F. The flag is a sequence: could a client clear it (or read it) by its OID, without USAGE
# on grantkey_meta? (held)

def test_a_client_cannot_clear_the_withholding_flag(
    http: httpx.Client, limited: Account, admin_url: str,
) -> None:
    over_the_limit(http, limited, admin_url)
    seq = ("(SELECT c.oid FROM pg_class c WHERE c.relname = 'create_withheld_flag')")
    for q in (f"SELECT setval({seq}, 0)",
              "SELECT pg_relation_size(" + seq + "); REVOKE CREATE ON SCHEMA public FROM PUBLIC"):
        response = limited.sql(http, q, limited.master_token)
        assert response.status_code in (400, 403), (q, response.text)
    read = limited.sql(http, f"SELECT pg_sequence_last_value({seq}) AS v", limited.master_token)
    assert read.status_code in (400, 403) or read.json()["rows"] == [{"v": None}], read.text
    assert withholding(admin_url, limited)


# G. Key creation takes the quota's lock (the limit's row) before its schema GRANT; the
# GRANT's end gives every table lacking it the quota trigger, in the admin's transaction
# with no lock_timeout: it waits for a key's EXPLAIN ANALYZE table the key holds. The sweep's
# first step waits for the admin (never ended), gives up after 3 s, and its watchdog ends
# nobody; meanwhile the master's request crosses the limit and copies tables unrefused.
# Was a break: 20 copies made over the limit, none refused (the control without the key holds).

@pytest.mark.parametrize("with_key", [True, False])  # (False: the control, which holds)
def test_a_key_creation_waiting_on_a_held_table_does_not_stall_the_withholding(
    limited: Account, admin_url: str, make_key: Callable[..., Any],
    owner_sql: Callable[[Account, str], None], with_key: bool,
) -> None:
    from tests.security.quota_support import COPY_LOOP

    owner_sql(limited, "CREATE SCHEMA extra")  # the new key's GRANT is a new one
    helper = make_key(limited, "helper", table_grants([], create_schemas=("public",)))
    hold = ("BEGIN; EXPLAIN ANALYZE CREATE TABLE kt AS SELECT 1 AS id; COMMIT; "
            "BEGIN; LOCK TABLE kt IN ROW EXCLUSIVE MODE; SELECT pg_sleep(2.8); COMMIT")

    def create_key() -> httpx.Response | None:
        time.sleep(0.3)
        if not with_key:
            return None
        with httpx.Client(timeout=30) as client:
            return client.post(limited.keys_url, params=limited.master(), json={
                "name": "late", "grants": table_grants([], create_schemas=("extra",))})

    held, created, copied = in_threads(
        lambda: get(limited, hold, helper.token), create_key,
        lambda: get(limited, COPY_LOOP, limited.master_token, delay=0.5))
    statuses = [getattr(r, "status_code", r) for r in (held, created, copied)]
    assert getattr(copied, "status_code", None) == 200, (statuses, getattr(copied, "text", ""))
    row = copied.json()["rows"][0]
    assert row["refused_at"], (
        f"{row['copies']} copies made over the limit, none refused; statuses {statuses}; "
        f"{[getattr(r, 'text', '')[:150] for r in (held, created)]}")
