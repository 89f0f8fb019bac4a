"""What the storage quota's tests share: a limit just above a database's size, a fill that
crosses it, and what a refusal and a withheld CREATE look like."""

from __future__ import annotations

import time

import httpx
import psycopg

from grantkey.db.storage_quota import MEASURE_SECONDS
from tests.conftest import Account

QUOTA = "DB Quota exceeded"
# ~5.5 MB of rows that stay uncompressed (under the TOAST threshold)
FILL = "INSERT INTO {table} SELECT g, repeat('x', 1000) FROM generate_series(1, 5000) AS g"
HEADROOM = 3 * 1024 * 1024


def set_quota(admin_url: str, account: Account, headroom: int | None) -> None:
    """The database's limit: its size now plus `headroom` bytes (None: no quota); the
    metadata says so too (as `serve` records it), before the server first reads the user."""
    with psycopg.connect(admin_url, dbname=account.user.database, autocommit=True) as conn:
        row = conn.execute(
            "UPDATE grantkey_meta.storage_quota SET limit_bytes = "
            "CASE WHEN %s::bigint IS NULL THEN NULL "
            "ELSE pg_database_size(current_database()) + %s::bigint END "
            "RETURNING coalesce(limit_bytes::text, '-1')", [headroom, headroom]).fetchone()
        conn.execute("SELECT grantkey_meta.fit_create_to_quota()")  # as set_limit does
    with psycopg.connect(admin_url, dbname="grantkey", autocommit=True) as conn:
        conn.execute("UPDATE public.users SET storage_quota = %s WHERE id = %s",
                     [row[0] if row else "-1", account.user.id])


def fill(http: httpx.Client, account: Account, token: str | None, table: str = "big") -> None:
    """Cross the quota: the statement that crosses it still completes (a soft quota), then
    let the last measure (made before it, under the limit) expire."""
    response = account.sql(http, FILL.format(table=table), token)
    assert response.status_code == 200, response.text
    time.sleep(MEASURE_SECONDS + 0.1)


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == [QUOTA]
    assert "delete rows or tables to write again" in body["hint"]


SNEAKY = [
    "EXPLAIN ANALYZE CREATE TABLE sneaky AS SELECT * FROM big",
    "EXPLAIN ANALYZE SELECT * INTO sneaky FROM big",
    "EXPLAIN ANALYZE CREATE MATERIALIZED VIEW sneaky AS SELECT * FROM big",
    "DO $$BEGIN EXECUTE 'EXPLAIN ANALYZE CREATE TABLE sneaky AS SELECT * FROM big'; END$$",
]


def withholding(admin_url: str, account: Account) -> bool | None:
    """True once CREATE is withheld (committed), False once it is back (committed), None
    in between (the flag is set before the withholding commits, and cleared just before
    the restore does)."""
    with psycopg.connect(admin_url, dbname=account.user.database) as conn:
        row = conn.execute(
            "SELECT last_value <> 0, EXISTS (SELECT 1 FROM grantkey_meta.create_withheld) "
            "FROM grantkey_meta.create_withheld_flag").fetchone()
    assert row is not None
    flag, records = row
    return True if flag and records else False if not (flag or records) else None


def wait_withholding(admin_url: str, account: Account, active: bool) -> None:
    """The sweep after a request withholds or restores CREATE: wait for it (at most 10 s)."""
    deadline = time.monotonic() + 10
    while withholding(admin_url, account) is not active:
        assert time.monotonic() < deadline, f"CREATE withholding never became {active}"
        time.sleep(0.05)


def schema_acl(admin_url: str, account: Account, schema: str) -> list[str]:
    with psycopg.connect(admin_url, dbname=account.user.database) as conn:
        row = conn.execute("SELECT coalesce(nspacl, acldefault('n', nspowner))::text[] "
                           "FROM pg_namespace WHERE nspname = %s", [schema]).fetchone()
        assert row is not None
        return sorted(row[0])


def over_the_limit(http: httpx.Client, account: Account, admin_url: str) -> None:
    fill(http, account, account.master_token)
    assert account.sql(http, "SELECT 1", account.master_token).status_code == 200
    wait_withholding(admin_url, account, True)


def back_under_the_limit(http: httpx.Client, account: Account, admin_url: str) -> None:
    emptied = account.sql(http, "TRUNCATE big", account.master_token)
    assert emptied.status_code == 200, emptied.text
    wait_withholding(admin_url, account, False)


def assert_no_create(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    assert "permission denied for schema" in response.json()["error"][0]


# One request: cross the limit, then copy a table by EXPLAIN ANALYZE every tenth of a second
# for two seconds, until refused; answers where it was refused and how many copies exist.
COPY_LOOP = (
    "DO $$DECLARE until timestamptz; BEGIN " + FILL.format(table="big") + "; "
    "until := clock_timestamp() + interval '2 seconds'; "
    "FOR i IN 1..1000 LOOP EXIT WHEN clock_timestamp() > until; BEGIN "
    "EXECUTE pg_catalog.format('EXPLAIN ANALYZE CREATE TABLE copy%s AS "
    "SELECT * FROM big LIMIT 10', i); "
    "EXCEPTION WHEN insufficient_privilege THEN "
    "PERFORM set_config('gk.refused', i::text, false); EXIT; END; "
    "PERFORM pg_sleep(0.1); END LOOP; END$$; "
    "SELECT current_setting('gk.refused', true) AS refused_at, "
    "(SELECT count(*) FROM pg_tables WHERE tablename LIKE 'copy%') AS copies")
