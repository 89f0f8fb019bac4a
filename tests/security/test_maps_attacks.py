"""The Maps API as an attacker uses it: a layer's SQL is client SQL, run as the requesting
key's role at creation (the probes) and for every tile, never as the owner or an admin;
each escape of the SQL API's escape tests fails there too, and so do the ways out of the
wrapping a layer's SQL is put in."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from grantkey.cli.embedded import EmbeddedPostgres
from tests.api.test_maps_api import SETUP, layer, maps_url
from tests.conftest import Account, KeyHandle
from tests.security.test_sql_escapes import ESCAPES
from tests.support import table_grants

BREAKOUTS = [
    # out of `SELECT * FROM (<sql>) AS cdbq LIMIT $1`: a second statement
    "SELECT * FROM places) AS q; {escape}; SELECT * FROM (SELECT * FROM places",
    # a comment that would swallow the wrapping's end
    "{escape} --",
    "{escape} /*",
]


@pytest.fixture
def attack(postgis: None, account: Account, make_account: Callable[[], Account],
           owner_sql: Callable[[Account, str], None],
           make_key: Callable[..., KeyHandle]) -> tuple[Account, Account, KeyHandle]:
    owner_sql(account, SETUP + "CREATE TABLE visible (v int);"
                               "CREATE TABLE secrets2 (s text); INSERT INTO secrets2 VALUES ('x')")
    other = make_account()
    owner_sql(other, "CREATE TABLE other_secrets (s text)")
    key = make_key(account, "attacker", table_grants(
        [("public", "places", ["select"]), ("public", "visible", ["select"])], ("sql", "maps")))
    return account, other, key


def _escape(attempt: str, account: Account, other: Account, key: KeyHandle) -> str:
    return attempt.replace("secrets", "secrets2").format(
        owner=account.user.owner_role, other_owner=other.user.owner_role,
        other_db=other.user.database, self=key.role)


def _still_confined(http: httpx.Client, account: Account, key: KeyHandle) -> None:
    assert account.sql(http, "SELECT * FROM secrets2", key.token).status_code == 403
    assert account.sql(http, "SELECT current_user, session_user", key.token).json()["rows"] == [
        {"current_user": key.role, "session_user": key.role}]
    assert account.sql(http, "SELECT count(*) AS n FROM places", account.master_token
                       ).json()["rows"] == [{"n": 3}]
    assert not Path("/tmp/grantkey-pwned").exists()


@pytest.mark.parametrize("attempt", ESCAPES)
def test_sql_api_escapes_fail_as_layer_sql(
        http: httpx.Client, attack: tuple[Account, Account, KeyHandle], attempt: str) -> None:
    account, other, key = attack
    escape = _escape(attempt, account, other, key)
    for shape in ["{escape}", *BREAKOUTS]:
        config = {"layers": [layer(shape.format(escape=escape))]}
        response = http.post(maps_url(account), json=config, params={"api_key": key.token})
        assert response.status_code in (400, 403, 404), (shape, response.text)
        assert "errors_with_context" in response.json()
    _still_confined(http, account, key)


@pytest.mark.parametrize("attempt", ESCAPES)
def test_sql_api_escapes_fail_in_the_tiles_of_a_map_the_master_made(
        http: httpx.Client, attack: tuple[Account, Account, KeyHandle], attempt: str) -> None:
    """The master may make a map whose layer the key could not: the key's tiles still run
    as the key (and the master's own probes refuse what PostgreSQL refuses the owner)."""
    account, other, key = attack
    escape = _escape(attempt, account, other, key)
    # the whole row as text: every column of the escape is computed
    config = {"layers": [layer(f"SELECT * FROM places WHERE (SELECT e::text FROM ({escape}) "
                               "AS e LIMIT 1) IS NOT NULL")]}
    made = http.post(maps_url(account), json=config, params={"api_key": account.master_token})
    if made.status_code == 200:
        url = f"{maps_url(account)}/{made.json()['layergroupid']}/0/0/0.mvt"
        response = http.get(url, params={"api_key": key.token})
        assert response.status_code in (400, 403, 404), response.text
    else:
        assert made.status_code in (400, 403, 404), made.text
    _still_confined(http, account, key)


def test_a_tile_cannot_write_through_a_function_the_master_made(
        http: httpx.Client, attack: tuple[Account, Account, KeyHandle],
        owner_sql: Callable[[Account, str], None]) -> None:
    account, _, key = attack
    owner_sql(account, "CREATE FUNCTION public.scribble() RETURNS boolean LANGUAGE sql "
                       "AS 'INSERT INTO visible VALUES (1) RETURNING true'")
    config = {"layers": [layer("SELECT * FROM places WHERE public.scribble()")]}
    made = http.post(maps_url(account), json=config, params={"api_key": key.token})
    assert made.status_code == 200  # nothing runs at creation
    response = http.get(f"{maps_url(account)}/{made.json()['layergroupid']}/0/0/0.mvt",
                        params={"api_key": key.token})
    assert response.status_code == 403
    assert response.json()["errors"] == ["permission denied for table visible"]
    count = account.sql(http, "SELECT count(*) AS n FROM visible", account.master_token)
    assert count.json()["rows"] == [{"n": 0}]


@pytest.fixture
def embedded(data_dir: Path) -> EmbeddedPostgres:
    if os.environ.get("GRANTKEY_TEST_DATABASE_URL"):
        pytest.skip("reads the embedded cluster's log")
    return EmbeddedPostgres(data_dir / "cluster")


def _logged(admin_url: str, embedded: EmbeddedPostgres, marker: str) -> bool:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_rotate_logfile()")  # flushes the collector's file
    return any(marker in path.read_text(errors="replace")
               for path in embedded.log_files() if path.exists())


def test_no_layer_sql_of_a_key_runs_as_the_owner_or_an_admin(
        http: httpx.Client, attack: tuple[Account, Account, KeyHandle], admin_url: str,
        embedded: EmbeddedPostgres) -> None:
    """Every session in the user's database logs its statements, but the key's: the layer
    SQL of a key's map (creation probes, tiles) never reaches the log, so it ran in no
    other session; the master's does (the trap works)."""
    account, _, key = attack
    database = sql.Identifier(account.user.database)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET log_statement = 'all'").format(database))
        conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} SET log_statement = 'none'").format(
            sql.Identifier(key.role), database))
    try:
        for token, should_log in ((key.token, False), (account.master_token, True)):
            marker = f"marker{secrets.token_hex(8)}"
            config = {"layers": [layer(f"SELECT *, '{marker}' AS m FROM places")]}
            made = http.post(maps_url(account), json=config, params={"api_key": token})
            assert made.status_code == 200, made.text
            url = f"{maps_url(account)}/{made.json()['layergroupid']}/0/0/0.mvt"
            assert http.get(url, params={"api_key": token}).status_code == 200
            assert _logged(admin_url, embedded, marker) is should_log
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} RESET log_statement").format(database))


@pytest.mark.parametrize("planted", [
    # better matches than PostGIS's own for the tile statement's calls, if a key could plant
    "CREATE FUNCTION public.st_asmvtgeom(geometry, geometry, integer, integer, boolean) "
    "RETURNS geometry LANGUAGE sql AS 'SELECT $1'",
    "CREATE FUNCTION public.st_tileenvelope(integer, integer, integer, margin numeric) "
    "RETURNS geometry LANGUAGE sql AS 'SELECT NULL::geometry'",
    "CREATE FUNCTION public.to_jsonb(record) RETURNS jsonb LANGUAGE sql AS 'SELECT NULL::jsonb'",
])
def test_a_key_that_creates_tables_cannot_plant_functions_tiles_would_call(
        http: httpx.Client, attack: tuple[Account, Account, KeyHandle],
        make_key: Callable[..., KeyHandle], planted: str) -> None:
    """Tiles call PostGIS by name in the user's search path: a key may create tables in
    `public` but never code (the guard), so it cannot put a better match there."""
    account, _, _ = attack
    builder = make_key(account, "builder", table_grants(
        [("public", "places", ["select"])], ("sql", "maps"), create_schemas=("public",)))
    assert account.sql(http, "CREATE TABLE mine (id int)", builder.token).status_code == 200
    refused = account.sql(http, planted, builder.token)
    assert refused.status_code in (400, 403), refused.text
    made = http.post(maps_url(account), json={"layers": [layer("SELECT * FROM places")]},
                     params={"api_key": builder.token})
    url = f"{maps_url(account)}/{made.json()['layergroupid']}/0/0/0.mvt"
    assert http.get(url, params={"api_key": builder.token}).status_code == 200
