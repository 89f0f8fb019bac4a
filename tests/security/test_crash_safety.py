"""SIGKILL the server in the middle of key creation and deletion, and the CLI in the middle
of user creation; after a restart (which runs the start-up repair) everything is whole."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import Account, Login
from tests.support import ServerProcess, apis_only, table_grants


def problems(admin_url: str) -> list[str]:
    """Every key row has its role (with its memberships); every role belongs to someone."""
    found: list[str] = []
    with psycopg.connect(admin_url, dbname="grantkey") as conn:
        users = conn.execute("SELECT id, username, database, state FROM users").fetchall()
        roles = {r for (r,) in conn.execute("SELECT rolname FROM pg_roles WHERE rolname ~ '^gk_'")}
        databases = {d for (d,) in conn.execute("SELECT datname FROM pg_database")}
    owners = {user_id for user_id, *_ in users}
    for role in roles:
        if role.split("_")[1] not in owners:
            found.append(f"role {role} belongs to no user")
    for user_id, username, database, state in users:
        if state != "ready":
            found.append(f"user {username} left in state {state}")
            continue
        if database not in databases:
            found.append(f"user {username} has no database")
            continue
        with psycopg.connect(admin_url, dbname=database) as conn:
            keys = conn.execute("SELECT name, role FROM grantkey_meta.api_keys").fetchall()
            members = {(m, r) for m, r in conn.execute(
                "SELECT u.rolname, g.rolname FROM pg_auth_members a JOIN pg_roles u "
                "ON u.oid = a.member JOIN pg_roles g ON g.oid = a.roleid")}
        key_roles = {role for _, role in keys}
        for name, role in keys:
            if role not in roles:
                found.append(f"key {name} of {username} has no role")
        for role in roles:
            if role.startswith(f"gk_{user_id}_k") and role not in key_roles:
                found.append(f"role {role} has no key row")
        for name, role in keys:
            if role.startswith(f"gk_{user_id}_k") and (
                (role, f"gk_{user_id}_reader") not in members
                or (f"gk_{user_id}_owner", role) not in members):
                found.append(f"key {name} of {username} lacks its memberships")
    return found


def start_server(data_dir: Path, login: Login, name: str) -> ServerProcess:
    process = ServerProcess(login.args(data_dir), data_dir / f"{name}.log", login.env)
    process.wait_healthy()
    return process


@pytest.mark.slow
def test_server_killed_during_key_churn_leaves_everything_whole(
    account: Account, data_dir: Path, admin_url: str, login: Login, owner_sql: object,
    server: ServerProcess,
) -> None:
    owner_sql(account, "CREATE TABLE t (id serial PRIMARY KEY)")  # type: ignore[operator]
    chooser = random.Random(7)
    for round_number in range(6):
        victim = start_server(data_dir, login, f"victim-{round_number}")
        url = f"{victim.url}/user/{account.username}/api/v3/api_keys"

        def churn(base: str = url, number: int = round_number) -> None:
            with httpx.Client(timeout=5) as http:
                for index in range(200):
                    name = f"crash-{number}-{index}"
                    try:
                        http.post(base, params=account.master(), json={
                            "name": name, "grants": table_grants([("public", "t", ["select"])])})
                        http.delete(f"{base}/crash-{number}-{index - 1}", params=account.master())
                    except httpx.HTTPError:
                        return

        worker = threading.Thread(target=churn)
        worker.start()
        time.sleep(chooser.uniform(0.2, 1.0))
        victim.stop(signal.SIGKILL)
        worker.join(timeout=30)
    survivor = start_server(data_dir, login, "survivor")
    try:
        assert problems(admin_url) == []
        url = f"{survivor.url}/user/{account.username}/api/v3/api_keys"
        created = httpx.post(url, params=account.master(),
                             json={"name": "after", "grants": apis_only("sql")})
        assert created.status_code == 201
        sql = httpx.get(f"{survivor.url}/user/{account.username}/api/v2/sql",
                        params={"q": "SELECT 1 AS x", "api_key": created.json()["token"]})
        assert sql.json()["rows"] == [{"x": 1}]
    finally:
        survivor.stop()


USER_STEPS = ["user.reserved", "user.roles_created", "user.database_created",
              "user.keys_inserted", "user.database_prepared"]
KEY_STEPS = ["key.validated", "key.role_created", "key.privileges_granted", "key.row_inserted"]


def cli(*args: str, login: Login, crash_at: str | None = None) -> int:
    env = {**os.environ, **login.env}
    if crash_at:
        env["GRANTKEY_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "grantkey.cli", *args, "--database-url",
                           login.database_url], env=env, capture_output=True,
                          timeout=120).returncode


@pytest.mark.slow
def test_cli_killed_at_each_step_of_user_creation_is_repaired_at_start_up(
    data_dir: Path, admin_url: str, login: Login, server: ServerProcess,
) -> None:
    names = [f"crash-{os.getpid()}-{i}" for i in range(len(USER_STEPS))]
    for name, step in zip(names, USER_STEPS, strict=True):
        assert cli("users", "create", name, login=login, crash_at=step) == -signal.SIGKILL
    with psycopg.connect(admin_url, dbname="grantkey") as conn:
        states: dict[str, str] = dict(conn.execute(
            "SELECT username, state FROM users WHERE username = ANY(%s)", [names]).fetchall())
    assert states == dict.fromkeys(names, "creating"), "each crash left a half-made user"
    restarted = start_server(data_dir, login, "after-user-crashes")  # runs the repair
    restarted.stop()
    assert problems(admin_url) == []
    with psycopg.connect(admin_url, dbname="grantkey") as conn:
        left = conn.execute("SELECT count(*) FROM users WHERE username = ANY(%s)",
                            [names]).fetchone()
    assert left == (0,)


@pytest.mark.slow
def test_cli_killed_at_each_step_of_key_creation_leaves_nothing(
    account: Account, admin_url: str, login: Login, owner_sql: object,
) -> None:
    owner_sql(account, "CREATE TABLE crashed (id serial PRIMARY KEY)")  # type: ignore[operator]
    for step in KEY_STEPS:
        code = cli("keys", "create", account.username, "doomed", "--table",
                   "public.crashed:select,insert", login=login, crash_at=step)
        assert code == -signal.SIGKILL
        assert problems(admin_url) == []
    assert cli("keys", "create", account.username, "doomed", "--table",
               "public.crashed:select", login=login) == 0
    assert problems(admin_url) == []
