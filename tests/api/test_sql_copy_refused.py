"""COPY to or from the client on the plain SQL endpoint: a clear 400, never a frozen worker.

A COPY answer puts the session in copy mode; a read loop that took it for an error spun at
100% CPU forever, with the event loop (time limits, SIGTERM, every other request) stopped.
Each case is sent on new TCP connections until both server workers have answered it, and
each request has a short client timeout so a frozen worker fails the test instead of
hanging it.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Account, KeyHandle
from tests.support import ServerProcess, table_grants

COPY_MESSAGE = ("COPY to or from the client (COPY ... TO STDOUT, COPY ... FROM STDIN) is not "
                "supported on the SQL API endpoint")


def _fresh(account: Account, q: str, token: str | None) -> httpx.Response:
    params = {"q": q} if token is None else {"q": q, "api_key": token}
    with httpx.Client(timeout=10, headers={"Connection": "close"}) as http:
        return http.get(account.sql_url, params=params)


def _on_every_worker(server: ServerProcess, account: Account, q: str,
                     token: str | None) -> list[httpx.Response]:
    params = {"q": q} if token is None else {"q": q, "api_key": token}
    return server.on_every_worker("GET", account.sql_url, timeout=10, params=params)


def _every_worker_still_answers(server: ServerProcess, account: Account,
                                token: str | None) -> None:
    for health in server.on_every_worker("GET", f"{account.base_url}/health", timeout=5):
        assert health.status_code == 200
    for answer in _on_every_worker(server, account, "SELECT 7 AS n", token):
        assert answer.json()["rows"] == [{"n": 7}]


@pytest.fixture
def key(account: Account, owner_sql: Callable[[Account, str], None],
        make_key: Callable[..., KeyHandle]) -> KeyHandle:
    owner_sql(account, "CREATE TABLE cities (name text); INSERT INTO cities VALUES ('Lima')")
    return make_key(account, "copier", table_grants([("public", "cities", ["select", "insert"])]))


def _assert_refused(server: ServerProcess, account: Account, q: str, token: str | None) -> None:
    for response in _on_every_worker(server, account, q, token):
        assert response.status_code == 400, response.text
        assert response.json() == {"error": [COPY_MESSAGE]}


@pytest.mark.parametrize("q", [
    "COPY (SELECT 1) TO STDOUT",
    "copy (select g from generate_series(1, 100000) g) to stdout with (format csv)",
    "SELECT 1; COPY (SELECT 1) TO STDOUT",
])
def test_copy_to_stdout_answers_400_and_the_worker_still_answers(
    account: Account, key: KeyHandle, q: str, server: ServerProcess,
) -> None:
    for token in (None, account.master_token, key.token):
        _assert_refused(server, account, q, token)
        _every_worker_still_answers(server, account, token)


@pytest.mark.parametrize("q", [
    "COPY cities FROM STDIN",
    "COPY cities (name) FROM STDIN WITH (FORMAT csv)",
    "SELECT 1; COPY cities FROM STDIN",
])
def test_copy_from_stdin_answers_400_and_the_worker_still_answers(
    account: Account, key: KeyHandle, q: str, server: ServerProcess,
) -> None:
    for token in (account.master_token, key.token):
        _assert_refused(server, account, q, token)
        _every_worker_still_answers(server, account, token)
    # with no key the table is not writable: PostgreSQL refuses before any copy starts,
    # but a temporary table of its own is, and that copy is refused the same way
    _assert_refused(server, account, "CREATE TEMP TABLE mine (a int); COPY mine FROM STDIN", None)
    _every_worker_still_answers(server, account, None)


def test_a_refused_copy_leaves_nothing_of_its_query_written(
    account: Account, key: KeyHandle, server: ServerProcess,
) -> None:
    for token in (account.master_token, key.token):
        for copy in ("COPY (SELECT 1) TO STDOUT", "COPY cities FROM STDIN"):
            _assert_refused(server, account, f"INSERT INTO cities VALUES ('Quito'); {copy}", token)
    rows = _fresh(account, "SELECT name FROM cities ORDER BY name", key.token).json()["rows"]
    assert rows == [{"name": "Lima"}]


def test_a_refused_copy_inside_an_open_transaction_leaves_the_pooled_session_clean(
    account: Account, key: KeyHandle,
) -> None:
    with httpx.Client(timeout=10) as http:  # one connection: one worker, its pooled sessions
        q = "BEGIN; INSERT INTO cities VALUES ('Cusco'); COPY (SELECT 1) TO STDOUT"
        response = account.sql(http, q, key.token)
        assert response.status_code == 400
        assert account.sql(http, "SELECT count(*) AS n FROM cities", key.token
                           ).json()["rows"] == [{"n": 1}]
        status = account.sql(http, "SELECT txid_current_if_assigned() IS NULL AS fresh", key.token)
        assert status.json()["rows"] == [{"fresh": True}]  # not inside a left-over transaction
