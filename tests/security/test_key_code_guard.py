"""The guard: API keys create tables (and what tables need), never code another role would
run; no client creates large objects. Enforced by PostgreSQL (an event trigger and revoked
functions installed by the superuser into each user database), not by reading SQL."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import psycopg
import pytest

from tests.conftest import Account, KeyHandle
from tests.support import table_grants

GUARD = "an API key cannot run"
NO_GUARD = ("Grants schema create is not available on this server: keys that create tables "
            "need a guard against creating code, which only a PostgreSQL superuser can install")


@pytest.fixture
def creator(account: Account, owner_sql: Callable[[Account, str], None],
            make_key: Callable[..., KeyHandle]) -> KeyHandle:
    owner_sql(account, "CREATE TABLE cities (name varchar(40)); INSERT INTO cities VALUES ('Lima');"
                       "CREATE TABLE secrets (s text)")
    return make_key(account, "creator", table_grants([("public", "cities", ["select"])],
                                                     create_schemas=("public",)))


CODE = [
    "CREATE FUNCTION public.lower(varchar) RETURNS text LANGUAGE sql AS 'SELECT $1::text'",
    "CREATE OR REPLACE FUNCTION public.f() RETURNS int LANGUAGE plpgsql AS $$BEGIN RETURN 1; END$$",
    "CREATE PROCEDURE public.p() LANGUAGE sql AS 'SELECT 1'",
    "CREATE AGGREGATE public.agg(int) (SFUNC = int4pl, STYPE = int)",
    "CREATE OPERATOR public.### (LEFTARG = int, RIGHTARG = int, FUNCTION = int4pl)",
    "CREATE TYPE public.mood AS ENUM ('calm')",
    "CREATE TYPE public.pair AS (a int, b int)",
    "CREATE DOMAIN public.positive AS int CHECK (VALUE > 0)",
    "CREATE TABLE public.mine (a int); CREATE RULE r AS ON INSERT TO public.mine DO ALSO NOTHING",
    "CREATE TABLE public.mine2 (a int); CREATE TRIGGER t BEFORE INSERT ON public.mine2 "
    "FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()",
    "CREATE TEXT SEARCH CONFIGURATION public.cfg (COPY = pg_catalog.simple)",
    "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "DO $$BEGIN EXECUTE 'CREATE FUNCTION public.g() RETURNS int LANGUAGE sql AS ''SELECT 1'''; END$$",
    "CREATE TABLE public.mine3 (a int); CREATE POLICY p ON public.mine3 USING (true)",
    "CREATE CAST (int AS public.nosuch) WITH INOUT",
]


@pytest.mark.parametrize("statement", CODE)
def test_a_key_with_schema_create_cannot_create_code(
    http: httpx.Client, account: Account, creator: KeyHandle, statement: str,
) -> None:
    response = account.sql(http, statement, creator.token)
    assert response.status_code == 403, response.text
    assert GUARD in response.json()["error"][0]


@pytest.mark.parametrize("statement", [
    "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE TEMP TABLE t (a int); CREATE TRIGGER x BEFORE INSERT ON pg_temp.t FOR EACH ROW "
    "EXECUTE FUNCTION suppress_redundant_updates_trigger()",
])
def test_a_client_with_no_key_cannot_create_code_even_in_its_temporary_schema(
    http: httpx.Client, account: Account, statement: str,
) -> None:
    response = account.sql(http, statement)
    assert response.status_code == 403 and GUARD in response.text


def test_tables_and_what_tables_need_still_work_for_a_key(
    http: httpx.Client, account: Account, creator: KeyHandle,
) -> None:
    statements = [
        "CREATE TABLE public.places (id serial PRIMARY KEY, name text DEFAULT 'x')",
        "CREATE INDEX places_name ON public.places (lower(name))",
        "CREATE SEQUENCE public.counter", "ALTER TABLE public.places ADD COLUMN note text",
        "CREATE VIEW public.named AS SELECT name FROM public.cities",
        "CREATE MATERIALIZED VIEW public.m AS SELECT 1 AS a", "REFRESH MATERIALIZED VIEW public.m",
        "COMMENT ON TABLE public.places IS 'mine'", "GRANT SELECT ON public.places TO PUBLIC",
        "CREATE TABLE public.copy AS SELECT * FROM public.cities", "DROP TABLE public.copy",
        "CREATE TEMP TABLE scratch (a int)",
    ]
    for statement in statements:
        response = account.sql(http, statement, creator.token)
        assert response.status_code == 200, (statement, response.text)
    with_no_key = account.sql(http, "CREATE TEMP TABLE scratch (a int)")
    assert with_no_key.status_code == 200


def test_ddl_after_set_role_to_a_shared_privilege_role_is_refused(
    account: Account, creator: KeyHandle,
) -> None:
    with creator.connect() as conn:
        roles = [r for (r,) in conn.execute(
            "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
            "WHERE m.member = current_user::regrole")]
        for role in roles:
            conn.execute(f'SET ROLE "{role}"')
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=GUARD):
                conn.execute("CREATE TABLE public.shared (a int)")
            conn.execute("RESET ROLE")


def test_a_key_cannot_give_what_it_creates_to_a_shared_privilege_role(
    http: httpx.Client, account: Account, creator: KeyHandle,
) -> None:
    roles = account.sql(http, "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g "
                        "ON g.oid = m.roleid WHERE m.member = current_user::regrole",
                        creator.token).json()["rows"]
    assert roles
    for row in roles:
        response = account.sql(http, f'CREATE TABLE public.given (a int); '
                               f'ALTER TABLE public.given OWNER TO "{row["rolname"]}"',
                               creator.token)
        assert response.status_code == 403, response.text
        if row["rolname"].endswith("_c"):  # the one PostgreSQL itself would allow
            assert "an API key cannot give away what it owns" in response.text


def test_the_master_still_creates_code_but_cannot_remove_the_guard(
    http: httpx.Client, account: Account,
) -> None:
    made = account.sql(http, "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                       account.master_token)
    assert made.status_code == 200, made.text
    for attack in ("ALTER EVENT TRIGGER grantkey_guard DISABLE", "DROP EVENT TRIGGER grantkey_guard",
                   "CREATE OR REPLACE FUNCTION grantkey_meta.refuse_key_code() RETURNS "
                   "event_trigger LANGUAGE plpgsql AS $$BEGIN END$$",
                   "ALTER DATABASE CURRENT SET session_replication_role = replica"):
        response = account.sql(http, attack, account.master_token)
        assert response.status_code in (400, 403), (attack, response.text)


@pytest.mark.parametrize("statement", [
    "SELECT lo_create(0)", "SELECT lo_creat(-1)", "SELECT lo_from_bytea(0, 'x')",
])
def test_no_client_can_create_large_objects(
    http: httpx.Client, account: Account, creator: KeyHandle, statement: str,
) -> None:
    for token in (None, creator.token, account.master_token):
        response = account.sql(http, statement, token)
        assert response.status_code == 403, response.text
        assert "permission denied for function" in response.json()["error"][0]


def test_schema_create_is_refused_where_the_guard_is_missing(
    http: httpx.Client, account: Account, admin_url: str,
    owner_sql: Callable[[Account, str], None],
) -> None:
    owner_sql(account, "CREATE TABLE t (a int)")
    with psycopg.connect(admin_url, dbname=account.user.database, autocommit=True) as conn:
        conn.execute("DROP EVENT TRIGGER grantkey_guard")
    refused = http.post(account.keys_url, params=account.master(), json={
        "name": "maker", "grants": table_grants([], create_schemas=("public",))})
    assert refused.status_code == 422
    assert refused.json()["errors"] == f"Validation failed: {NO_GUARD}"
    plain = http.post(account.keys_url, params=account.master(), json={
        "name": "reader", "grants": table_grants([("public", "t", ["select"])])})
    assert plain.status_code == 201
