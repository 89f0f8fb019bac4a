"""A client that changes its own role (password, settings) cannot break a key for anyone:
the settings that matter are pinned in every key session, a refused login of a valid key
restores the role's password and retries once, the start resets role settings, and
`grantkey users repair` restores every key role of a user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import Account, KeyHandle, Login
from tests.support import ServerProcess, end_backends, table_grants


def fresh(account: Account, q: str, token: str | None) -> httpx.Response:
    params = {"q": q} if token is None else {"q": q, "api_key": token}
    with httpx.Client(timeout=15, headers={"Connection": "close"}) as client:
        return client.get(account.sql_url, params=params)


def end_sessions(admin_url: str, role: str) -> None:
    """Pooled sessions would hide the change: end them, as a restart or an idle reap would."""
    end_backends(admin_url, role=role)


@pytest.fixture
def reader(account: Account, owner_sql: Callable[[Account, str], None],
           make_key: Callable[..., KeyHandle]) -> KeyHandle:
    owner_sql(account, "CREATE TABLE cities (name text); INSERT INTO cities VALUES ('Lima')")
    return make_key(account, "reader", table_grants([("public", "cities", ["select"])]))


@pytest.mark.parametrize("who", ["default public", "regular", "master"])
def test_a_client_changing_its_roles_password_does_not_break_the_key(
    account: Account, reader: KeyHandle, admin_url: str, who: str, server: ServerProcess,
) -> None:
    token = {"default public": None, "regular": reader.token, "master": account.master_token}[who]
    role = {"default public": account.user.public_role, "regular": reader.role,
            "master": account.user.owner_role}[who]
    changed = fresh(account, "ALTER ROLE CURRENT_USER PASSWORD 'x'", token)
    assert changed.status_code == 200, changed.text
    end_sessions(admin_url, role)
    params = {"q": "SELECT 1 AS ok"} if token is None else {"q": "SELECT 1 AS ok", "api_key": token}
    # both workers: each finds the login refused, restores, retries
    for answer in server.on_every_worker("GET", account.sql_url, timeout=15, params=params):
        assert answer.status_code == 200, (answer.text, server.log_path.read_text()[-1500:])
        assert answer.json()["rows"] == [{"ok": 1}]


@pytest.mark.parametrize("setting", [
    "statement_timeout = 1", "default_transaction_read_only = on", "search_path = nowhere",
    "DateStyle = 'SQL, DMY'", "lock_timeout = 1", "idle_in_transaction_session_timeout = 1",
])
def test_role_settings_made_by_a_client_do_not_reach_later_sessions(
    account: Account, reader: KeyHandle, admin_url: str, setting: str,
) -> None:
    for q in (f"ALTER ROLE CURRENT_USER SET {setting}",
              f"ALTER ROLE CURRENT_USER IN DATABASE \"{account.user.database}\" SET {setting}"):
        assert fresh(account, q, None).status_code == 200
    end_sessions(admin_url, account.user.public_role)
    for _ in range(4):
        answer = fresh(account, "SELECT pg_sleep(0.01), name, now()::date AS d FROM cities", None)
        assert answer.status_code == 403  # cities is private: the query ran normally
        made = fresh(account, "CREATE TEMP TABLE t (a int); SELECT 1 AS ok", None)
        assert made.json()["rows"] == [{"ok": 1}], made.text


@pytest.mark.slow  # starts its own server
def test_start_up_and_the_cli_repair_tampered_roles(
    account: Account, reader: KeyHandle, admin_url: str, login: Login, data_dir: Path,
) -> None:
    with reader.connect() as conn:
        conn.execute("ALTER ROLE CURRENT_USER SET work_mem = '64kB'")
    restarted = ServerProcess(login.args(data_dir), data_dir / "repair-start.log", login.env)
    try:
        restarted.wait_healthy()
    finally:
        restarted.stop()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        settings = conn.execute("SELECT count(*) FROM pg_db_role_setting s JOIN pg_roles r "
                                "ON r.oid = s.setrole WHERE r.rolname = %s", [reader.role])
        assert settings.fetchone() == (0,)
    for role_token in ((reader.role, reader.token), (account.user.public_role, "default_public")):
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'ALTER ROLE "{role_token[0]}" PASSWORD \'tampered\'')
    result = subprocess.run(
        [sys.executable, "-m", "grantkey.cli", "users", "repair", account.username, "--json",
         "--database-url", login.database_url], capture_output=True, text=True, timeout=60,
        env={**os.environ, **login.env})
    assert result.returncode == 0, result.stderr
    assert {"Master", "Default public", "reader"} <= set(json.loads(result.stdout)["restored"])
    with reader.connect() as conn:  # the derived password works again, straight away
        assert conn.execute("SELECT 1").fetchone() == (1,)
