"""A key inherits the public tables' rights, but cannot watch or signal the sessions of the
default public key or of other keys (keys join a reader role, not the public login role)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import psycopg
import pytest

from tests.conftest import Account, KeyHandle
from tests.support import table_grants

MARKER = "marker-7f3a"


@pytest.fixture
def two_keys(account: Account, owner_sql: Callable[[Account, str], None],
             make_key: Callable[..., KeyHandle]) -> tuple[KeyHandle, KeyHandle]:
    owner_sql(account, "CREATE TABLE shown (a int); INSERT INTO shown VALUES (1)")
    return (make_key(account, "watcher", table_grants([])),
            make_key(account, "other", table_grants([])))


def _busy(account: Account, token: str | None) -> threading.Thread:
    def run() -> None:
        params = {"q": f"SELECT pg_sleep(2.5), '{MARKER}' AS m"}
        if token is not None:
            params["api_key"] = token
        httpx.get(account.sql_url, params=params, timeout=30)
    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.7)
    return thread


@pytest.mark.parametrize("victim", ["default public", "another key"])
def test_a_key_cannot_read_or_end_other_sessions(
    http: httpx.Client, account: Account, two_keys: tuple[KeyHandle, KeyHandle], victim: str,
    admin_url: str,
) -> None:
    watcher, other = two_keys
    victim_role = account.user.public_role if victim == "default public" else other.role
    thread = _busy(account, None if victim == "default public" else other.token)
    try:
        seen = account.sql(http, "SELECT query, usename FROM pg_stat_activity "
                           f"WHERE query LIKE '%{MARKER}%' AND pid <> pg_backend_pid()",
                           watcher.token)
        assert seen.status_code == 200
        assert seen.json()["rows"] == []
        with psycopg.connect(admin_url, autocommit=True) as conn:
            pids = [pid for (pid,) in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND usename = %s",
                [f"%{MARKER}%", victim_role])]
        assert pids, "the victim's query was not running"
        for pid in pids:
            ended = account.sql(http, f"SELECT pg_terminate_backend({pid})", watcher.token)
            # refused: 403 "permission denied to terminate process" (PostgreSQL 16+), 400 "must
            # be a member of the role whose process is being terminated ..." (15)
            assert ended.status_code in (400, 403), ended.text
            assert "permission denied" in ended.text or "must be a member" in ended.text
    finally:
        thread.join()


def test_a_key_still_reads_public_tables_made_public_before_and_after_it(
    http: httpx.Client, account: Account, two_keys: tuple[KeyHandle, KeyHandle],
    owner_sql: Callable[[Account, str], None],
) -> None:
    watcher, _ = two_keys
    datasets = f"{account.base_url}/user/{account.username}/api/v4/datasets"
    assert account.sql(http, "SELECT a FROM shown", watcher.token).status_code == 403
    assert http.patch(f"{datasets}/shown", params=account.master(),
                      json={"privacy": "public"}).status_code == 200
    assert account.sql(http, "SELECT a FROM shown", watcher.token).json()["rows"] == [{"a": 1}]
    assert account.sql(http, "SELECT a FROM shown").json()["rows"] == [{"a": 1}]
    assert http.patch(f"{datasets}/shown", params=account.master(),
                      json={"privacy": "private"}).status_code == 200
    assert account.sql(http, "SELECT a FROM shown", watcher.token).status_code == 403
