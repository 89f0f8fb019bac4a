"""Logged in to PostgreSQL *as a key's role* (its derived password): what it can and cannot do."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

from grantkey.services.container import Services
from tests.conftest import Account, KeyHandle, builtin_handle
from tests.support import table_grants

SETUP = """
CREATE TABLE world_population (id serial PRIMARY KEY, country text, people bigint);
INSERT INTO world_population (country, people) VALUES ('Chile', 19), ('Peru', 33);
CREATE TABLE liked_cities (id serial PRIMARY KEY, name text);
CREATE TABLE national_incomes (country text, income numeric);
INSERT INTO national_incomes VALUES ('Chile', 1);
"""
WORKED_EXAMPLE = table_grants(
    [("public", "world_population", ["select"]), ("public", "liked_cities", ["select", "insert"])],
    create_schemas=("public",),
)


@pytest.fixture
def worked(account: Account, owner_sql: Callable[[Account, str], None],
           make_key: Callable[..., KeyHandle]) -> tuple[Account, KeyHandle]:
    owner_sql(account, SETUP)
    return account, make_key(account, "worked", WORKED_EXAMPLE)


def denied(conn: psycopg.Connection[Any], statement: str, message: str = "permission denied") -> None:
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(statement.encode())
    assert message in str(caught.value)


def test_key_role_has_least_privilege_attributes(worked: tuple[Account, KeyHandle]) -> None:
    _, key = worked
    with key.connect() as conn:
        row = conn.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, "
            "rolcanlogin FROM pg_roles WHERE rolname = current_user").fetchone()
        assert row == (False, False, False, False, False, True)
        assert conn.execute("SELECT session_user = %s", [key.role]).fetchone() == (True,)


def test_granted_privileges_work(worked: tuple[Account, KeyHandle]) -> None:
    _, key = worked
    with key.connect() as conn:
        assert conn.execute("SELECT count(*) FROM world_population").fetchone() == (2,)
        conn.execute("INSERT INTO liked_cities (name) VALUES ('Lima')")  # serial needs the sequence
        assert conn.execute("SELECT name FROM liked_cities").fetchall() == [("Lima",)]


@pytest.mark.parametrize("statement", [
    "UPDATE world_population SET people = 0",
    "DELETE FROM world_population",
    "INSERT INTO world_population (country) VALUES ('x')",
    "SELECT * FROM national_incomes",
    "DELETE FROM liked_cities",
    "TRUNCATE world_population",
])
def test_ungranted_privileges_fail_with_permission_denied(
    worked: tuple[Account, KeyHandle], statement: str
) -> None:
    _, key = worked
    with key.connect() as conn:
        denied(conn, statement)


def test_schema_create_key_owns_what_it_creates(worked: tuple[Account, KeyHandle]) -> None:
    _, key = worked
    with key.connect() as conn:
        conn.execute("CREATE TABLE mine AS SELECT country FROM world_population")
        conn.execute("ALTER TABLE mine ADD COLUMN note text")
        conn.execute("ALTER TABLE mine RENAME TO mine2")
        conn.execute("DROP TABLE mine2")


def test_schema_create_key_cannot_drop_or_alter_what_it_does_not_own(
    worked: tuple[Account, KeyHandle]
) -> None:
    _, key = worked
    with key.connect() as conn:
        denied(conn, "DROP TABLE world_population", "must be owner of table world_population")
        denied(conn, "ALTER TABLE liked_cities ADD COLUMN x int", "must be owner of table")


def test_regular_key_reads_a_table_made_public_later(
    worked: tuple[Account, KeyHandle], services: Services,
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    account, key = worked
    with key.connect() as conn:
        denied(conn, "SELECT * FROM national_incomes")
        run(services.datasets.change_privacy(account.user, "public", "national_incomes",
                                             "public"))
        assert conn.execute("SELECT count(*) FROM national_incomes").fetchone() == (1,)
        run(services.datasets.change_privacy(account.user, "public", "national_incomes",
                                             "private"))
        denied(conn, "SELECT * FROM national_incomes")


@pytest.mark.parametrize("escape", [
    "RESET ROLE",
    "SET ROLE {owner}",
    "SET SESSION AUTHORIZATION {owner}",
    "SELECT set_config('role', '{owner}', false)",
    "SET ROLE {public}",
])
def test_role_escapes_do_not_reach_the_owner(
    worked: tuple[Account, KeyHandle], escape: str
) -> None:
    account, key = worked
    statement = escape.format(owner=account.user.owner_role, public=account.user.public_role)
    with key.connect() as conn:
        try:
            conn.execute(statement.encode())
        except psycopg.Error as error:
            assert "permission denied" in str(error) or "must be" in str(error)
        denied(conn, "SELECT * FROM national_incomes")
        # after SET ROLE the guard refuses any DDL ("permission denied: an API key cannot
        # run DROP TABLE"); without it PostgreSQL does ("must be owner")
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(b"DROP TABLE world_population")
        assert "must be owner" in str(caught.value) or "an API key cannot run" in str(caught.value)


def test_wrong_password_is_refused(worked: tuple[Account, KeyHandle]) -> None:
    _, key = worked
    wrong = key.conninfo.replace(key.password, "0" * len(key.password))
    with pytest.raises(psycopg.OperationalError, match=r"password authentication failed"):
        psycopg.connect(wrong)


def test_key_role_cannot_connect_elsewhere(
    worked: tuple[Account, KeyHandle], make_account: Callable[[], Account]
) -> None:
    _, key = worked
    other = make_account()
    for database in (other.user.database, "grantkey", "postgres", "template1"):
        with pytest.raises(psycopg.OperationalError, match=r"permission denied|not allowed"):
            psycopg.connect(key.conninfo, dbname=database)


def test_key_cannot_read_grantkey_metadata(worked: tuple[Account, KeyHandle]) -> None:
    _, key = worked
    with key.connect() as conn:
        denied(conn, "SELECT * FROM grantkey_meta.api_keys")


def test_default_public_role_logs_in_and_reads_nothing_private(
    worked: tuple[Account, KeyHandle], services: Any, box: Any
) -> None:
    account, _ = worked
    public = builtin_handle(services, box, account, account.user.public_role, "default_public")
    with public.connect() as conn:
        denied(conn, "SELECT * FROM world_population")
        denied(conn, "CREATE TABLE t (x int)")


def test_master_role_is_the_owner(worked: tuple[Account, KeyHandle], services: Any,
                                  box: Any) -> None:
    account, _ = worked
    master = builtin_handle(services, box, account, account.user.owner_role,
                            account.master_token)
    with master.connect() as conn:
        assert conn.execute("SELECT count(*) FROM national_incomes").fetchone() == (1,)
        conn.execute("CREATE TABLE by_master (x int)")
        denied(conn, "CREATE ROLE evil")
        denied(conn, "SELECT * FROM grantkey_meta.api_keys")
