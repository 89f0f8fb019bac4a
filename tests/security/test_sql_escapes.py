"""Escape attempts through the SQL API fail, and leave the key exactly as weak as before."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Account, KeyHandle
from tests.support import table_grants

ESCAPES = [
    "RESET ROLE; SELECT * FROM secrets",
    "SET ROLE {owner}; SELECT * FROM secrets",
    "SET SESSION AUTHORIZATION {owner}; SELECT * FROM secrets",
    "SELECT set_config('role', '{owner}', false); SELECT * FROM secrets",
    "SET ROLE {other_owner}",
    "SELECT * FROM {other_db}.public.other_secrets",
    "COPY (SELECT 1) TO PROGRAM 'touch /tmp/grantkey-pwned'",
    "COPY secrets FROM PROGRAM 'id'",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT pg_ls_dir('.')",
    "SELECT lo_import('/etc/passwd')",
    "CREATE EXTENSION dblink",
    "CREATE ROLE evil LOGIN SUPERUSER",
    "CREATE DATABASE evil",
    "ALTER SYSTEM SET log_statement = 'all'",
    "ALTER ROLE {self} SUPERUSER",
    "GRANT {owner} TO {self}",
    "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "SELECT * FROM grantkey_meta.api_keys",
    "SELECT rolpassword FROM pg_authid",
]


@pytest.fixture
def setting(account: Account, make_account: Callable[[], Account],
            owner_sql: Callable[[Account, str], None],
            make_key: Callable[..., KeyHandle]) -> tuple[Account, Account, KeyHandle]:
    owner_sql(account, "CREATE TABLE secrets (s text); INSERT INTO secrets VALUES ('x');"
                       "CREATE TABLE visible (v int)")
    other = make_account()
    owner_sql(other, "CREATE TABLE other_secrets (s text)")
    key = make_key(account, "attacker", table_grants([("public", "visible", ["select"])]))
    return account, other, key


@pytest.mark.parametrize("attempt", ESCAPES)
def test_escape_attempt_fails(
    http: httpx.Client, setting: tuple[Account, Account, KeyHandle], attempt: str
) -> None:
    account, other, key = setting
    q = attempt.format(owner=account.user.owner_role, other_owner=other.user.owner_role,
                       other_db=other.user.database, self=key.role)
    response = account.sql(http, q, key.token)
    assert response.status_code in (400, 403), response.text
    assert "error" in response.json()
    still = account.sql(http, "SELECT * FROM secrets", key.token)
    assert still.status_code == 403
    assert account.sql(http, "SELECT current_user, session_user", key.token).json()["rows"] == [
        {"current_user": key.role, "session_user": key.role}]


def test_master_cannot_escape_the_user_either(
    http: httpx.Client, setting: tuple[Account, Account, KeyHandle]
) -> None:
    account, other, _ = setting
    for q in ("CREATE ROLE evil", "ALTER SYSTEM SET fsync = off",
              f"SET ROLE {other.user.owner_role}", "SELECT * FROM grantkey_meta.api_keys",
              "COPY (SELECT 1) TO PROGRAM 'id'", "CREATE DATABASE evil"):
        response = account.sql(http, q, account.master_token)
        assert response.status_code in (400, 403), (q, response.text)
