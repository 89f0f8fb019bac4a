"""Why a key was refused (issue 15, feature 5): PostgreSQL's message kept, and a `hint` naming
what the key holds on the object the message names and what it lacks, computed from its live
privileges (never from the SQL), about no other object; a missing API grant names the key's
APIs. Expired keys, restrictions and rate limits have theirs (test_key_lifetime.py,
test_key_restrictions.py, test_rate_limits.py)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Account
from tests.support import table_grants

IMMUTABLE = "Keys are immutable: create a key with the permission the statement needs"


@pytest.fixture
def tables(account: Account, owner_sql: Callable[[Account, str], None]) -> Account:
    owner_sql(account, "CREATE TABLE things (id int); CREATE TABLE hidden (id int); "
                       "CREATE SCHEMA other; CREATE TABLE other.things (id int)")
    return account


def key(http: httpx.Client, account: Account, name: str, grants: object) -> str:
    answer = http.post(account.keys_url, params=account.master(), json={"name": name,
                                                                        "grants": grants})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["token"])


def test_a_refused_write_names_what_the_key_may_do_on_that_table(
        http: httpx.Client, tables: Account) -> None:
    token = key(http, tables, "reader", table_grants([("public", "things", ["select"])]))
    answer = tables.sql(http, "INSERT INTO things VALUES (1)", token)
    assert answer.status_code == 403
    body = answer.json()
    assert body["error"] == ["permission denied for table things"]
    assert body["hint"] == (
        'key "reader" may select public.things but not insert, update or delete; '
        "has no permission on other.things. " + IMMUTABLE)


def test_a_table_the_key_has_nothing_on_is_named_and_no_other_table(
        http: httpx.Client, tables: Account) -> None:
    token = key(http, tables, "reader", table_grants([("public", "things", ["select", "insert"])]))
    body = tables.sql(http, "SELECT * FROM hidden", token).json()
    assert body["hint"] == f'key "reader" has no permission on public.hidden. {IMMUTABLE}'
    assert "things" not in body["hint"]


def test_a_schema_refusal_says_what_the_key_holds_on_the_schema(
        http: httpx.Client, tables: Account) -> None:
    token = key(http, tables, "reader", table_grants([("public", "things", ["select"])]))
    body = tables.sql(http, "CREATE TABLE other.mine (id int)", token).json()
    assert body["error"] == ["permission denied for schema other"]
    assert body["hint"] == f'key "reader" has no permission on schema other. {IMMUTABLE}'


def test_a_missing_api_grant_names_the_apis_the_key_has(http: httpx.Client,
                                                        tables: Account) -> None:
    token = key(http, tables, "mapper", [{"type": "apis", "apis": ["maps"]}])
    answer = tables.sql(http, "SELECT 1", token)
    assert answer.status_code == 403
    assert answer.json() == {"error": ["forbidden"], "hint": (
        'key "mapper" has no grant for the sql API (its APIs: maps); create a key with "sql" '
        "in its apis")}


def test_tenant_functions_shadowing_the_checks_never_run_in_grantkeys_session(
        http: httpx.Client, tables: Account, owner_sql: Callable[[Account, str], None]) -> None:
    """The master's own functions named like the built-ins grantkey calls (public is the
    tenant's): the hint still comes from pg_catalog's, and the trap never fires."""
    owner_sql(tables, """
        CREATE TABLE trap_log (at timestamptz DEFAULT now());
        CREATE FUNCTION public.has_table_privilege(text, oid, text) RETURNS boolean
          LANGUAGE sql AS 'INSERT INTO public.trap_log DEFAULT VALUES RETURNING true';
        CREATE FUNCTION public.unnest(text[]) RETURNS SETOF text
          LANGUAGE sql AS 'INSERT INTO public.trap_log DEFAULT VALUES RETURNING ''select''';
        GRANT INSERT ON trap_log TO PUBLIC""")
    token = key(http, tables, "reader", table_grants([("public", "things", ["select"])]))
    body = tables.sql(http, "DELETE FROM things", token).json()
    assert body["hint"].startswith('key "reader" may select public.things but not insert')
    logged = tables.sql(http, "SELECT count(*) AS n FROM trap_log", tables.master_token).json()
    assert logged["rows"] == [{"n": 0}]


def test_the_master_key_gets_no_hint(http: httpx.Client, tables: Account,
                                     owner_sql: Callable[[Account, str], None]) -> None:
    answer = tables.sql(http, "SELECT * FROM pg_authid", tables.master_token)
    assert answer.status_code == 403 and "hint" not in answer.json()
