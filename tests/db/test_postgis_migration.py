"""A user database made before PostGIS was on the server gets it at the next start (user
migration 9, after the guard and the storage quota), and then works as a new one does."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import psycopg.rows
import pytest

from grantkey.db.migrations import USER_LATEST
from grantkey.services.container import Services
from grantkey.services.upgrade import upgrade_user_databases
from tests.conftest import Account, KeyHandle
from tests.support import table_grants

pytestmark = pytest.mark.in_process


def test_an_older_user_database_gets_postgis_at_start_up(
        postgis: None, account: Account, admin_url: str, services: Services,
        run: Callable[[Awaitable[Any]], Any], make_key: Callable[..., KeyHandle],
        owner_sql: Callable[[Account, str], None]) -> None:
    database = account.user.database
    with psycopg.connect(admin_url, dbname=database, autocommit=True) as conn:
        conn.execute("DROP EXTENSION postgis")  # as a database made before PostGIS was
        conn.execute("DELETE FROM grantkey_meta.schema_migrations WHERE version = 9")
    with psycopg.connect(admin_url, dbname="grantkey", autocommit=True) as conn:
        conn.execute("UPDATE users SET schema_version = 8 WHERE id = %s", [account.user.id])
    upgraded = run(upgrade_user_databases(services.cluster))
    assert upgraded.get(account.username) == USER_LATEST
    with psycopg.connect(admin_url, dbname=database, autocommit=True) as conn:
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'postgis'"
                            ).fetchone() is not None
    owner_sql(account, "CREATE TABLE spots (id int, the_geom geometry(Point, 4326));"
                       "INSERT INTO spots VALUES (1, ST_SetSRID(ST_MakePoint(1, 2), 4326))")
    key = make_key(account, "reader", table_grants([("public", "spots", ["select"])]))
    with key.connect() as conn:
        assert conn.execute("SELECT ST_X(the_geom) FROM spots").fetchone() == (1.0,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'")


def test_user_databases_are_cloned_from_a_postgis_template(
        postgis: None, account: Account, admin_url: str) -> None:
    """PostGIS's install script costs each new user about 0.2 s of the server's CPU: user
    databases are cloned from a template that has it, closed to connections."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname, datistemplate, datallowconn, "
            "has_database_privilege('public', oid, 'CONNECT') FROM pg_database "
            "WHERE datname LIKE 'grantkey_postgis%'").fetchall()
    # no half-made one left behind; nobody connects, PUBLIC may not
    assert rows == [("grantkey_postgis", True, False, False)]
    with psycopg.connect(admin_url, dbname=account.user.database) as conn:
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'postgis'"
                            ).fetchone() == (1,)


def test_a_postgis_template_another_role_owns_is_never_cloned(
        postgis: None, account: Account, admin_url: str, routine_url: str,
        run: Callable[[Awaitable[Any]], Any]) -> None:
    """On a shared server another role could make a database of the template's name (and
    mark it a template): only one grantkey's own login owns counts."""
    from grantkey.db import postgis as postgis_db

    async def ready(url: str) -> bool:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True,
                                                     row_factory=psycopg.rows.dict_row)
        async with conn:
            return await postgis_db.template_ready(conn)

    assert run(ready(routine_url)) is True  # grantkey's admin made it
    if admin_url != routine_url:  # (an external server: one login for both)
        assert run(ready(admin_url)) is False  # the superuser is another role: not its


def test_postgis_is_not_installed_over_code_the_master_planted_in_public(
        postgis: None, account: Account, admin_url: str, services: Services,
        run: Callable[[Awaitable[Any]], Any],
        owner_sql: Callable[[Account, str], None]) -> None:
    """PostGIS's install script runs as the superuser with `public` first in its search
    path: in a database made before PostGIS was on the server, its master had time to plant
    a function or an operator there that the script could call. The start-up migration then
    installs nothing, logs why and retries at the next start; the upgrade goes on."""
    database = account.user.database
    with psycopg.connect(admin_url, dbname=database, autocommit=True) as conn:
        conn.execute("DROP EXTENSION postgis")
        conn.execute("DELETE FROM grantkey_meta.schema_migrations WHERE version = 9")
    with psycopg.connect(admin_url, dbname="grantkey", autocommit=True) as conn:
        conn.execute("UPDATE users SET schema_version = 8 WHERE id = %s", [account.user.id])
    for planted in ("CREATE FUNCTION public.lower(text) RETURNS text LANGUAGE sql "
                    "AS 'SELECT ''planted''::text'",
                    "CREATE FUNCTION public.f(int, int) RETURNS int LANGUAGE sql "
                    "AS 'SELECT 1'; CREATE OPERATOR public.+ (FUNCTION = public.f, "
                    "LEFTARG = int, RIGHTARG = int)"):
        owner_sql(account, planted)
        upgraded = run(upgrade_user_databases(services.cluster))
        assert account.username not in upgraded  # logged, retried at the next start
        with psycopg.connect(admin_url, dbname=database) as conn:
            assert conn.execute("SELECT FROM pg_extension WHERE extname = 'postgis'"
                                ).fetchone() is None
        owner_sql(account, "DROP FUNCTION public.lower(text) CASCADE" if "lower" in planted
                  else "DROP FUNCTION public.f(int, int) CASCADE")
    assert run(upgrade_user_databases(services.cluster)).get(account.username) == USER_LATEST
    with psycopg.connect(admin_url, dbname=database) as conn:
        assert conn.execute("SELECT FROM pg_extension WHERE extname = 'postgis'"
                            ).fetchone() is not None
