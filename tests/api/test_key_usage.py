"""Key usage (issue 15, feature 4): requests per key, day and API and `last_used_at`, counted
in memory and written once a minute (here: when the test's own server stops, which writes
what it counted), read through GET …/api_keys/<name>/usage and `grantkey keys usage`; key
hygiene filters on the list (`unused_for`, `expiring_within`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import Account, Login
from tests.support import ServerProcess, table_grants

GRANTS = table_grants([("public", "things", ["select"])], ("sql", "maps"))


def create(http: httpx.Client, account: Account, name: str, **options: object) -> str:
    answer = http.post(account.keys_url, params=account.master(),
                       json={"name": name, "grants": GRANTS, **options})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["token"])


def names(http: httpx.Client, account: Account, **filters: str) -> list[str]:
    answer = http.get(account.keys_url, params={**account.master(), **filters})
    assert answer.status_code == 200, answer.text
    return [key["name"] for key in answer.json()["result"]]


@pytest.mark.slow  # a server of its own, stopped to write what it counted
def test_requests_are_counted_per_day_and_api_and_written_when_the_server_stops(
        data_dir: Path, login: Login, make_account: Callable[[], Account],
        http: httpx.Client) -> None:
    server = ServerProcess([*login.args(data_dir), "--workers", "2"], data_dir / "usage.log",
                           login.env)
    try:
        server.wait_healthy()
        account = make_account()
        here = Account(account.user, account.master_token, server.url)
        here.sql(http, "CREATE TABLE things (id int)", account.master_token)
        token = create(http, here, "counted")
        for _ in range(5):
            with httpx.Client(timeout=30) as client:  # both workers count some
                assert here.sql(client, "SELECT 1", token).status_code == 200
        named = f"{server.url}/user/{account.username}/api/v1/map/named"
        assert http.get(named, params={"api_key": token}).status_code in (200, 403)
        assert http.get(f"{here.keys_url}/counted", params={"api_key": token}).status_code == 200
    finally:
        server.stop()  # each worker writes what it counted as it stops
    answer = http.get(f"{account.keys_url}/counted/usage", params=account.master())
    assert answer.status_code == 200, answer.text
    usage = answer.json()
    today = datetime.now(UTC).date().isoformat()
    assert usage["days"] == [{"date": today, "requests": {"auth": 1, "maps": 1, "sql": 5}}]
    assert usage["total"] == {"auth": 1, "maps": 1, "sql": 5}
    assert usage["last_used_at"] is not None
    shown = http.get(f"{account.keys_url}/counted", params=account.master()).json()
    assert shown["last_used_at"] == usage["last_used_at"]
    assert "counted" not in names(http, account, unused_for="1d")
    done = subprocess.run([sys.executable, "-m", "grantkey.cli", "keys", "usage",
                           account.username, "counted", "--json", *login.args(data_dir)],
                          capture_output=True, text=True, env={**os.environ, **login.env},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == usage


def test_a_key_sees_its_own_usage_and_no_other_keys(http: httpx.Client, account: Account) -> None:
    account.sql(http, "CREATE TABLE things (id int)", account.master_token)
    mine = create(http, account, "mine")
    create(http, account, "other")
    own = http.get(f"{account.keys_url}/mine/usage", params={"api_key": mine})
    assert own.status_code == 200 and own.json()["name"] == "mine"
    assert own.json()["days"] == [] and own.json()["last_used_at"] is None
    other = http.get(f"{account.keys_url}/other/usage", params={"api_key": mine})
    assert other.status_code == 404
    for days in ("0", "367", "x"):
        wrong = http.get(f"{account.keys_url}/mine/usage", params={**account.master(),
                                                                  "days": days})
        assert wrong.status_code == 400
        assert wrong.json()["errors"] == "Wrong 'days' parameter value."


def test_hygiene_filters_list_unused_and_soon_expiring_keys(
        http: httpx.Client, account: Account, admin_url: str) -> None:
    account.sql(http, "CREATE TABLE things (id int)", account.master_token)
    create(http, account, "fresh")
    create(http, account, "stale")
    soon = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    create(http, account, "soon", expires_at=soon)
    create(http, account, "later", expires_at=later)
    with psycopg.connect(admin_url, dbname=account.user.database, autocommit=True) as conn:
        conn.execute("UPDATE grantkey_meta.api_keys SET created_at = now() - interval '40 days'"
                     " WHERE name IN ('stale', 'Master', 'Default public')")
        conn.execute("UPDATE grantkey_meta.api_keys SET last_used_at = now() - interval '1 day'"
                     " WHERE name = 'Master'")
    assert names(http, account, unused_for="30d") == ["Default public", "stale"]
    assert names(http, account, expiring_within="7d") == ["soon"]
    assert names(http, account, expiring_within="60d", order="name") == ["later", "soon"]
    for name, value in (("unused_for", "30"), ("expiring_within", "1w"), ("unused_for", ""),
                        ("unused_for", "36601d"), ("expiring_within", "9999999d")):
        wrong = http.get(account.keys_url, params={**account.master(), name: value})
        assert wrong.status_code == 400
        assert wrong.json()["errors"] == (f"Wrong '{name}' parameter value. Use a duration such "
                                          "as 30d, 12h, 90m or 3600s (at most 36600d)")
    assert names(http, account, unused_for="36600d") == []
