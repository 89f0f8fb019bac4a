"""Faults of PostgreSQL: a pooled session it closed is replaced, never answered 400; when
the embedded PostgreSQL dies, grantkey restarts it, answers 503 with Retry-After at once
meanwhile (/health/live stays 200), and serves every API again within 2 s of PostgreSQL
accepting connections."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from grantkey.cli.embedded import EmbeddedPostgres
from tests.conftest import Account, Login
from tests.support import ServerProcess, apis_only, end_backends

# each test starts its own server or cluster: out of the inner loop
pytestmark = pytest.mark.slow


def test_sessions_postgresql_closed_are_replaced_not_answered_400(
    http: httpx.Client, account: Account, admin_url: str,
) -> None:
    made = http.post(account.keys_url, params=account.master(),
                     json={"name": "pooled", "grants": apis_only("sql")})
    token = made.json()["token"]
    for _ in range(5):
        for key in (account.master_token, token, None):
            assert account.sql(http, "SELECT 1 AS a", key).status_code == 200
        # once the backends have exited their farewell has arrived: a query sent now
        # cannot run there and must go to a fresh session
        end_backends(admin_url, database=account.user.database)
        for key in (account.master_token, token, None):
            response = account.sql(http, "SELECT 1 AS a", key)
            assert response.status_code == 200, response.text


def test_a_session_ended_under_a_query_answers_503_never_400(
    http: httpx.Client, account: Account, admin_url: str,
) -> None:
    """A query PostgreSQL may have run before its session ended is not retried: 503 saying
    so (a server-side fault, not the client's)."""
    import threading

    def end_it() -> None:
        time.sleep(0.5)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND query LIKE 'SELECT pg_sleep(3)%%'",
                         [account.user.database])

    ender = threading.Thread(target=end_it)
    ender.start()
    response = account.sql(http, "SELECT pg_sleep(3) AS s", account.master_token)
    ender.join()
    assert response.status_code == 503, response.text
    assert "may or may not have run" in response.text
    assert response.headers["retry-after"] == "1"


@pytest.fixture
def embedded_server(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path, dict[str, str]]]:
    if os.environ.get("GRANTKEY_TEST_DATABASE_URL"):
        pytest.skip("needs grantkey's own embedded PostgreSQL")
    home = tmp_path / "faults"
    env = {k: "" for k in os.environ if k.startswith("GRANTKEY_")}
    server = ServerProcess(["--data-dir", str(home)], tmp_path / "faults.log", env)
    try:
        server.wait_healthy(timeout=90)
        yield server, home, env
    finally:
        server.stop()
        EmbeddedPostgres(home).stop()


def accepting(home: Path) -> bool:
    cluster = EmbeddedPostgres(home)
    try:
        with psycopg.connect(cluster.admin_url, connect_timeout=1):
            return True
    except psycopg.Error:
        return False


def test_a_killed_embedded_postgresql_is_restarted_and_every_api_comes_back(
    embedded_server: tuple[ServerProcess, Path, dict[str, str]],
) -> None:
    server, home, env = embedded_server
    created = subprocess.run(
        [sys.executable, "-m", "grantkey.cli", "users", "create", "faulty", "--json",
         "--data-dir", str(home)], capture_output=True, text=True, timeout=120,
        env={**os.environ, **env}, check=True)
    master = json.loads(created.stdout)["master_token"]
    sql = f"{server.url}/user/faulty/api/v2/sql"
    keys = f"{server.url}/user/faulty/api/v3/api_keys"
    with httpx.Client(timeout=10) as http:
        assert http.get(sql, params={"q": "SELECT 1", "api_key": master}).status_code == 200
        pid = int((home / "pg" / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        outage: list[tuple[str, int, str | None, float]] = []
        back_at: dict[str, float] = {}
        accepting_at = None
        while time.monotonic() - killed < 60 and len(back_at) < 3:
            if accepting_at is None and accepting(home):
                accepting_at = time.monotonic()
            assert http.get(f"{server.url}/health/live").status_code == 200
            for name, url, params in (("sql", sql, {"q": "SELECT 1", "api_key": master}),
                                      ("auth", keys, {"api_key": master}),
                                      ("ready", f"{server.url}/health/ready", {})):
                if name in back_at:
                    continue
                started = time.monotonic()
                response = http.get(url, params=params)
                took = time.monotonic() - started
                if response.status_code == 200:
                    back_at[name] = time.monotonic()
                else:
                    outage.append((name, response.status_code,
                                   response.headers.get("retry-after"), took))
            time.sleep(0.1)
    assert set(back_at) == {"sql", "auth", "ready"}, outage[-5:]
    assert accepting_at is not None
    assert all(status == 503 and retry == "1" for _, status, retry, _ in outage), outage
    assert max((took for *_, took in outage), default=0) < 1.0, outage
    assert max(back_at.values()) - accepting_at < 2.5, (back_at, accepting_at)
    assert "restarting it" in server.log_path.read_text()


def test_a_killed_worker_costs_at_most_its_requests_in_flight_and_comes_back(
    tmp_path: Path, login: Login, account: Account,
) -> None:
    """kill -9 of one of two workers: the other keeps serving, uvicorn starts a new one."""
    server = ServerProcess([*login.args(tmp_path), "--workers", "2"], tmp_path / "workers.log",
                           login.env)
    try:
        server.wait_healthy()
        sql = f"{server.url}/user/{account.username}/api/v2/sql"
        params = {"q": "SELECT 1 AS a", "api_key": account.master_token}

        def workers() -> list[int]:
            found = subprocess.run(["pgrep", "-P", str(server.process.pid)],
                                   capture_output=True, text=True).stdout.split()
            return [int(p) for p in found  # uvicorn's workers (not the resource tracker)
                    if b"spawn_main" in command_line(p)]

        before = workers()
        assert len(before) >= 2, before
        os.kill(before[0], signal.SIGKILL)
        statuses = []
        with httpx.Client(timeout=10) as http:
            for _ in range(50):
                try:
                    statuses.append(http.get(sql, params=params).status_code)
                except httpx.HTTPError:
                    statuses.append(0)
        assert statuses.count(200) >= 45, statuses
        for _ in range(100):
            if len([p for p in workers() if p not in before]) >= 1:
                break
            time.sleep(0.1)
        assert [p for p in workers() if p not in before], "no new worker was started"
    finally:
        server.stop()


def command_line(pid: str) -> bytes:
    """A process's command line; empty if it ended since it was listed."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""
