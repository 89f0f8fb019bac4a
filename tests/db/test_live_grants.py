"""Grants are read back from live PostgreSQL state, and hostile names are granted exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.conftest import Account, KeyHandle
from tests.support import table_grants

HOSTILE = [
    'we"ird',
    "semi;colon",
    "with space",
    "ÜñíçødéТаблица",
    "MixedCase",
    "select",
    "'; DROP TABLE canary; --",
    "robert'); DROP TABLE canary;--",
]


def shown(http: httpx.Client, account: Account, name: str) -> dict[str, Any]:
    response = http.get(f"{account.keys_url}/{name}", params=account.master())
    assert response.status_code == 200
    database: dict[str, Any] = response.json()["grants"][1]
    return database


def create_tables(account: Account, owner_sql: Callable[[Account, str], None],
                  schema: str, names: list[str]) -> None:
    statements = [sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))]
    statements += [sql.SQL("CREATE TABLE {} (id int)").format(sql.Identifier(schema, name))
                   for name in names]
    owner_sql(account, ";".join(s.as_string() for s in statements))


def test_hostile_table_names_are_granted_exactly_and_never_executed(
    http: httpx.Client, account: Account, owner_sql: Callable[[Account, str], None],
    make_key: Callable[..., KeyHandle],
) -> None:
    owner_sql(account, "CREATE TABLE canary (id int)")
    schema = 'Sch"ema; DROP'
    create_tables(account, owner_sql, schema, HOSTILE)
    key = make_key(account, "hostile", table_grants([(schema, n, ["select"]) for n in HOSTILE]))
    tables = shown(http, account, "hostile")["tables"]
    assert sorted((t["schema"], t["name"], tuple(t["permissions"])) for t in tables) == sorted(
        (schema, n, ("select",)) for n in HOSTILE)
    with key.connect() as conn:
        for name in HOSTILE:
            conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, name)))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(
                    sql.Identifier(schema, name)))
    owner_sql(account, "SELECT * FROM canary")  # still there: nothing was executed


def test_owner_true_for_tables_the_key_created(
    http: httpx.Client, account: Account, make_key: Callable[..., KeyHandle]
) -> None:
    key = make_key(account, "builder", table_grants([], create_schemas=("public",)))
    with key.connect() as conn:
        conn.execute("CREATE TABLE built (id serial, v text)")
    tables = shown(http, account, "builder")["tables"]
    assert tables == [{"schema": "public", "name": "built", "owner": True, "permissions": [
        "delete", "insert", "references", "select", "trigger", "truncate", "update"]}]


def test_dropped_table_disappears_and_renamed_shows_new_name(
    http: httpx.Client, account: Account, owner_sql: Callable[[Account, str], None],
    make_key: Callable[..., KeyHandle],
) -> None:
    owner_sql(account, "CREATE TABLE a (id int); CREATE TABLE b (id int)")
    make_key(account, "live", table_grants([("public", "a", ["select"]),
                                            ("public", "b", ["select", "update"])]))
    owner_sql(account, "DROP TABLE a; ALTER TABLE b RENAME TO b_renamed")
    tables = shown(http, account, "live")["tables"]
    assert tables == [{"schema": "public", "name": "b_renamed", "owner": False,
                       "permissions": ["select", "update"]}]


def test_recreated_table_is_not_granted_to_old_keys(
    account: Account, owner_sql: Callable[[Account, str], None],
    make_key: Callable[..., KeyHandle],
) -> None:
    owner_sql(account, "CREATE TABLE t (secret text)")
    old = make_key(account, "old", table_grants([("public", "t", ["select"])]))
    owner_sql(account, "DROP TABLE t; CREATE TABLE t (secret text); "
                       "INSERT INTO t VALUES ('new rows')")
    with old.connect() as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM t")
    new = make_key(account, "new", table_grants([("public", "t", ["select"])]))
    with new.connect() as conn:
        assert conn.execute("SELECT * FROM t").fetchall() == [("new rows",)]
    with old.connect() as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM t")


def test_views_can_be_granted_like_tables(
    http: httpx.Client, account: Account, owner_sql: Callable[[Account, str], None],
    make_key: Callable[..., KeyHandle],
) -> None:
    owner_sql(account, "CREATE TABLE base (x int); INSERT INTO base VALUES (7); "
                       "CREATE VIEW v AS SELECT x FROM base; "
                       "CREATE MATERIALIZED VIEW mv AS SELECT x FROM base")
    key = make_key(account, "views", table_grants([("public", "v", ["select"]),
                                                   ("public", "mv", ["select"])]))
    with key.connect() as conn:
        assert conn.execute("SELECT x FROM v").fetchall() == [(7,)]
        assert conn.execute("SELECT x FROM mv").fetchall() == [(7,)]
    assert {t["name"] for t in shown(http, account, "views")["tables"]} == {"v", "mv"}


def test_deleting_a_key_keeps_the_tables_it_created(
    http: httpx.Client, account: Account, make_key: Callable[..., KeyHandle],
    owner_sql: Callable[[Account, str], None],
) -> None:
    key = make_key(account, "temp", table_grants([], create_schemas=("public",)))
    with key.connect() as conn:
        conn.execute("CREATE TABLE survivor AS SELECT 1 AS x")
    assert http.delete(f"{account.keys_url}/temp", params=account.master()).status_code == 204
    owner_sql(account, "SELECT * FROM survivor; DROP TABLE survivor")


def test_privilege_roles_keep_table_acls_small(
    account: Account, owner_sql: Callable[[Account, str], None],
    make_key: Callable[..., KeyHandle], admin_url: str,
) -> None:
    owner_sql(account, "CREATE TABLE shared (id serial PRIMARY KEY)")
    keys = [make_key(account, f"k{i}", table_grants([("public", "shared", ["select", "insert"])]))
            for i in range(5)]
    with psycopg.connect(admin_url, dbname=account.user.database) as conn:
        acl = conn.execute("SELECT cardinality(relacl) FROM pg_class WHERE relname = 'shared'"
                           ).fetchone()
        direct = conn.execute(
            "SELECT count(*) FROM pg_class c, aclexplode(c.relacl) a JOIN pg_roles r "
            "ON r.oid = a.grantee WHERE c.relname = 'shared' AND r.rolname = ANY(%s)",
            [[k.role for k in keys]]).fetchone()
    assert acl is not None and acl[0] <= 3  # owner + select role + insert role
    assert direct == (0,)  # never a direct grant to a key role
