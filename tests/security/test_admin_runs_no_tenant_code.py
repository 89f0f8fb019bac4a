"""grantkey's own (admin) connections never run code a tenant planted in its database.

Functions and operators planted in `public` shadow the built-ins grantkey's own SQL calls:
each either matches the argument types better than the `pg_catalog` one (and so wins
overload resolution whatever the search path's order), or has the same signature and wins
once the tenant puts `public` first with `ALTER DATABASE … SET search_path`. Each records
who called it. Then every Auth API, datasets, SQL API, CLI and start-up path that touches
the user's database runs, and no call may have come from grantkey's admin login.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import Account, KeyHandle, Login
from tests.support import ServerProcess, table_grants

TRAP_LOG = """
CREATE TABLE public.trap_log (fn text, who name, superuser text);
GRANT INSERT, SELECT ON public.trap_log TO PUBLIC;
CREATE FUNCTION public.trap(fn text) RETURNS void LANGUAGE plpgsql SECURITY DEFINER
  SET search_path = pg_catalog AS
  $$ BEGIN INSERT INTO public.trap_log VALUES (fn, session_user, current_setting('is_superuser'));
     END $$;
GRANT EXECUTE ON FUNCTION public.trap(text) TO PUBLIC;
"""

# (signature, return type, body computing a plausible answer with the built-in)
SHADOWS = [
    ("starts_with(a name, b text)", "boolean", "pg_catalog.starts_with(a::text, b)"),
    ("starts_with(a name, b name)", "boolean", "pg_catalog.starts_with(a::text, b::text)"),
    ("starts_with(a name, b varchar)", "boolean", "pg_catalog.starts_with(a::text, b::text)"),
    ("starts_with(a text, b text)", "boolean", "pg_catalog.starts_with(a, b)"),
    ("hashtext(a varchar)", "integer", "pg_catalog.hashtext(a::text)"),
    ("hashtext(a text)", "integer", "pg_catalog.hashtext(a)"),
    ("lower(a name)", "text", "pg_catalog.lower(a::text)"),
    ("lower(a text)", "text", "pg_catalog.lower(a)"),
    ("has_table_privilege(a text, b oid, c text)", "boolean",
     "pg_catalog.has_table_privilege(a::name, b, c)"),
    ("has_table_privilege(a name, b oid, c varchar)", "boolean",
     "pg_catalog.has_table_privilege(a, b, c::text)"),
    ("pg_terminate_backend(a bigint)", "boolean", "pg_catalog.pg_terminate_backend(a::int)"),
    ("pg_terminate_backend(a integer)", "boolean", "pg_catalog.pg_terminate_backend(a)"),
    ("pg_notify(a varchar, b varchar)", "void", "pg_catalog.pg_notify(a::text, b::text)"),
    ("unnest(a text[])", "SETOF text", "pg_catalog.unnest(a)"),
    ("unnest(a oid[])", "SETOF oid", "pg_catalog.unnest(a)"),
    ("pg_advisory_xact_lock(a integer)", "void", "pg_catalog.pg_advisory_xact_lock(a::bigint)"),
    ("pg_has_role(a oid, b text)", "boolean", "pg_catalog.pg_has_role(a, b)"),
]
OPERATORS = [  # (operator, left, right): each calls a trap function of the same types
    ("~", "name", "name"), ("~", "name", "text"), ("~", "text", "text"),
    ("=", '"char"', "text"), ("=", "name", "text"), ("=", "text", "name"),
    ("=", "name", "varchar"), ("=", "oid", "bigint"), ("=", "oid", "integer"),
    ("=", "text", "text"), ("<>", "name", "text"), ("<>", "text", "text"),
]
COMPARISONS = {"~": "textregexeq", "=": "texteq", "<>": "textne"}


def plant_sql() -> str:
    statements = [TRAP_LOG]
    for signature, returns, body in SHADOWS:
        name = signature.partition("(")[0]
        if returns.startswith("SETOF"):
            code = f"BEGIN PERFORM public.trap('{name}'); RETURN QUERY SELECT {body}; END"
        elif returns == "void":
            code = f"BEGIN PERFORM public.trap('{name}'); PERFORM {body}; END"
        else:
            code = f"BEGIN PERFORM public.trap('{name}'); RETURN {body}; END"
        statements.append(f"CREATE FUNCTION public.{signature} RETURNS {returns} "
                          f"LANGUAGE plpgsql AS $${code}$$;")
    for number, (op, left, right) in enumerate(OPERATORS):
        function = f"public.op_{number}"
        compare = COMPARISONS[op]
        statements.append(
            f"CREATE FUNCTION {function}(a {left}, b {right}) RETURNS boolean LANGUAGE plpgsql "
            f"AS $$BEGIN PERFORM public.trap('{op}({left},{right})'); "
            f"RETURN pg_catalog.{compare}(a::text, b::text); END$$;")
        statements.append(f"CREATE OPERATOR public.{op} (LEFTARG = {left}, RIGHTARG = {right}, "
                          f"FUNCTION = {function});")
    return "\n".join(statements)


def planted_calls(admin_url: str, account: Account) -> list[tuple[str, str, str]]:
    with psycopg.connect(admin_url, dbname=account.user.database, autocommit=True) as conn:
        rows = conn.execute("SELECT fn, who::text, superuser FROM public.trap_log").fetchall()
    return [(str(fn), str(who), str(su)) for fn, who, su in rows]


def cli(login: Login, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **login.env}
    result = subprocess.run([sys.executable, "-m", "grantkey.cli", *args, "--database-url",
                             login.database_url], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def trapped(account: Account, owner_sql: Callable[[Account, str], None]) -> Account:
    owner_sql(account, "CREATE TABLE cities (id serial PRIMARY KEY, name varchar(40));"
              "INSERT INTO cities (name) VALUES ('Lima');"
              "CREATE TYPE mood AS ENUM ('calm', 'angry');"
              "CREATE TABLE moods (m mood); INSERT INTO moods VALUES ('calm');")
    owner_sql(account, plant_sql())
    return account


def drive_every_path(http: httpx.Client, account: Account, key: KeyHandle,
                     login: Login, data_dir: Path) -> None:
    keys, master = account.keys_url, account.master()
    datasets = f"{account.base_url}/user/{account.username}/api/v4/datasets"
    assert http.get(f"{keys}/{key.name}", params={"api_key": key.token}).status_code == 200
    assert http.get(keys, params={"api_key": key.token}).status_code == 200
    assert http.get(keys, params=master).status_code == 200
    created = http.post(keys, params=master, json={"name": "second", "grants": table_grants(
        [("public", "cities", ["select", "insert"]), ("public", "moods", ["select"])],
        create_schemas=("public",))})
    assert created.status_code == 201, created.text
    assert http.post(f"{keys}/second/token/regenerate", params=master).status_code == 200
    assert http.delete(f"{keys}/second", params=master).status_code == 204
    assert http.get(datasets, params=master).status_code == 200
    for privacy in ("public", "private"):
        assert http.patch(f"{datasets}/moods", params=master,
                          json={"privacy": privacy}).status_code == 200
    for token in (account.master_token, key.token):  # an unknown type: looked up by the admin
        answer = account.sql(http, "SELECT m FROM moods", token)
        assert answer.status_code == 200 and answer.json()["fields"]["m"]["pgtype"] == "mood"
    cli(login, "keys", "list", account.username)
    cli(login, "keys", "create", account.username, "third", "--api", "sql",
        "--table", "public.cities:select", "--schema-create", "public")
    cli(login, "keys", "regenerate", account.username, "third")
    cli(login, "keys", "delete", account.username, "third", "--yes")
    cli(login, "datasets", "list", account.username)
    cli(login, "datasets", "privacy", account.username, "cities", "public")
    cli(login, "users", "list")
    restarted = ServerProcess(login.args(data_dir), data_dir / "restart-trap.log", login.env)
    try:  # start-up: bootstrap, migrations, reconciliation
        restarted.wait_healthy()
        assert httpx.get(keys, params=master).status_code == 200
    finally:
        restarted.stop()


@pytest.mark.parametrize("path_first", [False, True], ids=["default-path", "public-first"])
def test_planted_functions_and_operators_never_run_on_grantkey_connections(
    trapped: Account, http: httpx.Client, make_key: Callable[..., KeyHandle], admin_url: str,
    login: Login, data_dir: Path, owner_sql: Callable[[Account, str], None], path_first: bool,
) -> None:
    if path_first:  # the owner owns its database: it can put public ahead of pg_catalog
        owner_sql(trapped, f'ALTER DATABASE "{trapped.user.database}" '
                           "SET search_path = public, pg_catalog")
    key = make_key(trapped, "first", table_grants(
        [("public", "cities", ["select"]), ("public", "moods", ["select"])],
        create_schemas=("public",)))
    drive_every_path(http, trapped, key, login, data_dir)
    calls = planted_calls(admin_url, trapped)
    assert calls == [], f"grantkey's own connections ran planted code: {calls}"


def test_the_trap_fires_for_a_connection_without_the_pinned_path(
    trapped: Account, admin_url: str,
) -> None:
    """The traps are real: the same query on a connection without the pinned search path
    runs the tenant's function."""
    with psycopg.connect(admin_url, dbname=trapped.user.database, autocommit=True) as conn:
        conn.execute("SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)", ["gk_"])
    assert any(fn == "starts_with" for fn, _, _ in planted_calls(admin_url, trapped))
