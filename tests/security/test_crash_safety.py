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

from tests.conftest import Account
from tests.support import TEST_SECRET, ServerProcess, apis_only, table_grants


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
                (role, f"gk_{user_id}_public") not in members
                or (f"gk_{user_id}_owner", role) not in members):
                found.append(f"key {name} of {username} lacks its memberships")
    return found


def start_server(data_dir: Path, admin_url: str, name: str) -> ServerProcess:
    process = ServerProcess(["--database-url", admin_url, "--data-dir", str(data_dir)],
                            data_dir / f"{name}.log", {"GRANTKEY_SECRET": TEST_SECRET})
    process.wait_healthy()
    return process


@pytest.mark.slow
def test_server_killed_during_key_churn_leaves_everything_whole(
    account: Account, data_dir: Path, admin_url: str, owner_sql: object, server: ServerProcess,
) -> None:
    owner_sql(account, "CREATE TABLE t (id serial PRIMARY KEY)")  # type: ignore[operator]
    chooser = random.Random(7)
    for round_number in range(6):
        victim = start_server(data_dir, admin_url, f"victim-{round_number}")
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
    survivor = start_server(data_dir, admin_url, "survivor")
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


@pytest.mark.slow
def test_cli_killed_during_user_creation_is_repaired_at_start_up(
    data_dir: Path, admin_url: str, server: ServerProcess,
) -> None:
    chooser = random.Random(11)
    env = {**os.environ, "GRANTKEY_SECRET": TEST_SECRET}
    names = []
    for attempt in range(8):
        name = f"killed-{os.getpid()}-{attempt}"
        names.append(name)
        creator = subprocess.Popen(
            [sys.executable, "-m", "grantkey.cli", "users", "create", name, "--database-url",
             admin_url], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(chooser.uniform(0.3, 1.2))  # the CLI's imports take ~0.3 s
        creator.send_signal(signal.SIGKILL)
        creator.wait()
    with psycopg.connect(admin_url, dbname="grantkey") as conn:
        states = dict(conn.execute("SELECT username, state FROM users WHERE username = ANY(%s)",
                                   [names]).fetchall())
    interrupted = [n for n in names if states.get(n) != "ready"]
    print(f"\nuser creations killed before the end: {len(interrupted)} of {len(names)}; "
          f"left half-made: {sum(1 for n in names if states.get(n) == 'creating')}")
    assert interrupted, "no kill landed inside a user creation: adjust the delays"
    restarted = start_server(data_dir, admin_url, "after-kills")  # runs the repair
    restarted.stop()
    assert problems(admin_url) == []
    with psycopg.connect(admin_url, dbname="grantkey") as conn:
        ready = [u for (u,) in conn.execute(
            "SELECT username FROM users WHERE username = ANY(%s)", [names])]
    for username in ready:  # fully made before the kill: usable, then cleaned up
        subprocess.run([sys.executable, "-m", "grantkey.cli", "users", "delete", username,
                        "--yes", "--database-url", admin_url], env=env, check=True,
                       capture_output=True)
    assert problems(admin_url) == []
