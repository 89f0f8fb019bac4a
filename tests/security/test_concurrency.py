"""16 clients hammer the SQL API while keys are created, regenerated and deleted.

After each delete or regenerate returns, the old token never succeeds again; no answer
is a 5xx; afterwards no session of the user's roles is left (pools reaped, revoked roles'
sessions terminated).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import Account, Login
from tests.support import ServerProcess, apis_only

CLIENTS = 16
SECONDS = 8.0


@pytest.fixture(scope="module")
def busy_server(data_dir: Path, login: Login, server: ServerProcess) -> Iterator[ServerProcess]:
    process = ServerProcess(
        [*login.args(data_dir), "--workers", "2"], data_dir / "busy.log",
        {**login.env, "GRANTKEY_SQL_IDLE_SECONDS": "1",
         "GRANTKEY_SQL_MAX_CONNECTIONS": "20"})
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


def user_sessions(admin_url: str, account: Account) -> int:
    with psycopg.connect(admin_url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                           "AND usename LIKE %s", [account.user.database,
                                                   f"gk\\_{account.user.id}\\_%"]).fetchone()
    return int(row[0]) if row else -1


@pytest.mark.slow
def test_hammering_while_keys_churn(
    account: Account, busy_server: ServerProcess, admin_url: str
) -> None:
    keys_url = f"{busy_server.url}/user/{account.username}/api/v3/api_keys"
    sql_url = f"{busy_server.url}/user/{account.username}/api/v2/sql"
    assert user_sessions(admin_url, account) == 0
    live: list[str] = []
    revoked: dict[str, float] = {}  # token -> when its delete/regenerate returned
    results: list[tuple[str, float, int]] = []  # token, request start, status
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[str] = []  # the bodies of 5xx answers, for the report

    def hammer(seed: int) -> None:
        chooser = random.Random(seed)
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                with lock:
                    pool = live + list(revoked)
                if not pool:
                    time.sleep(0.01)
                    continue
                token = chooser.choice(pool)
                started = time.monotonic()
                answer = http.get(sql_url, params={"q": "SELECT 1 AS x", "api_key": token})
                status = answer.status_code
                with lock:
                    results.append((token, started, status))
                    if status >= 500:
                        failures.append(f"{status} {answer.text[:300]}")

    def churn() -> None:
        chooser = random.Random(0)
        names: dict[str, str] = {}
        counter = 0
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                action = chooser.random()
                if action < 0.4 or len(names) < 3:
                    counter += 1
                    name = f"churn-{counter}"
                    token = http.post(keys_url, params={"api_key": account.master_token},
                                      json={"name": name, "grants": apis_only("sql")}
                                      ).json()["token"]
                    names[name] = token
                    with lock:
                        live.append(token)
                    continue
                name = chooser.choice(sorted(names))
                old = names[name]
                if action < 0.7:
                    response = http.post(f"{keys_url}/{name}/token/regenerate",
                                         params={"api_key": account.master_token})
                    assert response.status_code == 200
                    names[name] = response.json()["token"]
                else:
                    response = http.delete(f"{keys_url}/{name}",
                                           params={"api_key": account.master_token})
                    assert response.status_code == 204
                    del names[name]
                returned = time.monotonic()
                with lock:
                    live.remove(old)
                    revoked[old] = returned
                    if name in names:
                        live.append(names[name])
        with httpx.Client(timeout=30) as http:  # end: delete every key left
            for name in names:
                http.delete(f"{keys_url}/{name}", params={"api_key": account.master_token})

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(CLIENTS)]
    manager = threading.Thread(target=churn)
    for thread in [*threads, manager]:
        thread.start()
    time.sleep(SECONDS)
    stop.set()
    for thread in [*threads, manager]:
        thread.join(timeout=60)

    statuses: dict[int, int] = {}
    late_successes = []
    for token, started, status in results:
        statuses[status] = statuses.get(status, 0) + 1
        if token in revoked and started > revoked[token] and status == 200:
            late_successes.append((token[:8], started - revoked[token]))
    print(f"\nrequests: {len(results)}, statuses: {statuses}, revocations: {len(revoked)}")
    assert len(results) > 500 and len(revoked) > 10
    assert not [s for s in statuses if s >= 500], (
        statuses, failures[:5], busy_server.log_path.read_text()[-3000:])
    assert set(statuses) <= {200, 401, 429}, statuses
    assert late_successes == [], "an old token worked after its revocation returned"
    deadline = time.monotonic() + 15
    while user_sessions(admin_url, account) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert user_sessions(admin_url, account) == 0, "sessions of the user's roles were left"
