"""Time limits enforced from outside, clean sessions between requests, revocation mid-query."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import psycopg
import pytest

from tests.conftest import SQL_TIMEOUT, Account, KeyHandle
from tests.support import ServerProcess, apis_only, table_grants

TIMEOUT_MESSAGE = ("You are over platform's limits: SQL query timeout error. Refactor your query "
                   "before running again or contact your administrator for more details.")


@pytest.fixture
def key(account: Account, owner_sql: Callable[[Account, str], None],
        make_key: Callable[..., KeyHandle]) -> KeyHandle:
    owner_sql(account, "CREATE TABLE counter (n int)")
    return make_key(account, "worker", table_grants([("public", "counter", ["select", "insert"])],
                                                    create_schemas=("public",)))


def test_timeout_cannot_be_lifted_from_sql_and_answers_429(
    account: Account, key: KeyHandle
) -> None:
    with httpx.Client(timeout=30) as http:  # one connection: the same worker throughout
        started = time.monotonic()
        response = account.sql(http, "SET statement_timeout = 0; SELECT pg_sleep(60)", key.token)
        elapsed = time.monotonic() - started
        assert response.status_code == 429
        assert response.json() == {"error": [TIMEOUT_MESSAGE]}
        assert SQL_TIMEOUT - 0.5 < elapsed < SQL_TIMEOUT + 5
        assert account.sql(http, "SELECT 1 AS ok", key.token).json()["rows"] == [{"ok": 1}]


def test_streaming_select_is_also_time_limited(account: Account, key: KeyHandle) -> None:
    with httpx.Client(timeout=30) as http:
        response = account.sql(http, "SELECT pg_sleep(60)", key.token)
        assert response.status_code == 429
        assert account.sql(http, "SELECT 2 AS ok", key.token).status_code == 200


def same_backend(http: httpx.Client, account: Account, token: str) -> int:
    return int(account.sql(http, "SELECT pg_backend_pid() AS pid", token).json()["rows"][0]["pid"])


def test_open_transaction_is_rolled_back_before_reuse(account: Account, key: KeyHandle) -> None:
    with httpx.Client(timeout=30) as http:
        pid = same_backend(http, account, key.token)
        assert account.sql(http, "BEGIN; INSERT INTO counter VALUES (1)", key.token
                           ).status_code == 200
        assert same_backend(http, account, key.token) == pid  # the same pooled session
        rows = account.sql(http, "SELECT count(*) AS n FROM counter", key.token).json()["rows"]
        assert rows == [{"n": 0}]


def test_session_settings_and_temp_tables_do_not_leak(account: Account, key: KeyHandle) -> None:
    with httpx.Client(timeout=30) as http:
        pid = same_backend(http, account, key.token)
        account.sql(http, "SET search_path TO pg_catalog; CREATE TEMP TABLE scratch (x int)",
                    key.token)
        assert same_backend(http, account, key.token) == pid
        path = account.sql(http, "SELECT current_setting('search_path') AS p", key.token)
        assert path.json()["rows"] == [{"p": '"$user", public'}]
        gone = account.sql(http, "SELECT * FROM scratch", key.token)
        assert gone.status_code == 400 and "does not exist" in gone.json()["error"][0]


def test_single_statements_leave_nothing_behind_either(
    account: Account, key: KeyHandle, admin_url: str,
) -> None:
    """One statement has its DISCARD ALL pipelined behind it: settings, temporary tables
    and prepared statements are gone by the next request, and a session-level advisory
    lock is released when the request ends, not when the session is next used."""
    with httpx.Client(timeout=30) as http:
        pid = same_backend(http, account, key.token)
        for query in ("SET search_path TO pg_catalog", "CREATE TEMP TABLE scratch (x int)",
                      "PREPARE mine AS SELECT 1", "SELECT pg_advisory_lock(424242) AS l"):
            assert account.sql(http, query, key.token).status_code == 200, query
        with psycopg.connect(admin_url, dbname=account.user.database) as other:
            taken = other.execute("SELECT pg_try_advisory_lock(424242)").fetchone()
            assert taken == (True,)  # released with the request, the session idle
        assert same_backend(http, account, key.token) == pid
        path = account.sql(http, "SELECT current_setting('search_path') AS p", key.token)
        assert path.json()["rows"] == [{"p": '"$user", public'}]
        for query in ("SELECT * FROM scratch", "EXECUTE mine"):
            gone = account.sql(http, query, key.token)
            assert gone.status_code == 400 and "does not exist" in gone.json()["error"][0]
        begun = account.sql(http, "BEGIN", key.token)  # its pipelined reset fails: the slow way
        assert begun.status_code == 200
        assert account.sql(http, "INSERT INTO counter VALUES (7)", key.token).status_code == 200
        with psycopg.connect(admin_url, dbname=account.user.database) as other:
            # committed: the insert did not run inside that transaction
            assert other.execute("SELECT count(*) FROM counter WHERE n = 7").fetchone() == (1,)


def test_many_requests_on_one_pooled_session(account: Account, key: KeyHandle) -> None:
    with httpx.Client(timeout=30) as http:
        for index in range(30):
            response = account.sql(http, f"SELECT {index} AS i", key.token)
            assert response.json()["rows"] == [{"i": index}], response.text
            assert account.sql(http, "INSERT INTO counter VALUES (1)", key.token).status_code == 200


def test_deleting_a_key_ends_its_running_query_within_2_seconds(
    http: httpx.Client, account: Account, make_key: Callable[..., KeyHandle],
    server: object,
) -> None:
    sleeper = make_key(account, "sleeper", apis_only("sql"))
    outcome: dict[str, object] = {}

    def run() -> None:
        with httpx.Client(timeout=60) as own:
            response = account.sql(own, "SELECT pg_sleep(30)", sleeper.token)
            outcome["status"] = response.status_code
            outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)
    assert http.delete(f"{account.keys_url}/sleeper", params=account.master()).status_code == 204
    deleted = time.monotonic()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert float(outcome["ended"]) - deleted < 2.0  # type: ignore[arg-type]
    assert outcome["status"] == 401
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(sleeper.conninfo)


def test_regenerated_key_old_token_fails_on_sql_api_right_away(
    http: httpx.Client, account: Account, make_key: Callable[..., KeyHandle],
    server: ServerProcess,
) -> None:
    rot = make_key(account, "rot", apis_only("sql"))
    old = {"q": "SELECT 1", "api_key": rot.token}
    warmed = server.on_every_worker("GET", account.sql_url, params=old)  # caches and pools
    assert {answer.status_code for answer in warmed} == {200}
    new = http.post(f"{account.keys_url}/rot/token/regenerate", params=account.master()).json()
    refused = server.on_every_worker("GET", account.sql_url, params=old)
    assert {answer.status_code for answer in refused} == {401}
    assert account.sql(http, "SELECT 1", new["token"]).status_code == 200
