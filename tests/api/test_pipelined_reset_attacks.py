"""Attacks on the pipelined DISCARD ALL (commit 6f0a242): whatever a request does, the next
request on the same pooled session sees nothing of it, no worker hangs, nothing answers 500.

Each test asserts the SAFE behaviour."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

import httpx
import psycopg
import pytest

from tests.conftest import Account, KeyHandle
from tests.support import table_grants

DEFAULT_PATH = '"$user", public'
MARK = "SELECT set_config('search_path', 'pg_catalog', false)"


@pytest.fixture
def key(account: Account, owner_sql: Callable[[Account, str], None],
        make_key: Callable[..., KeyHandle]) -> KeyHandle:
    owner_sql(account, "CREATE TABLE counter (n int)")
    return make_key(account, "attacker", table_grants(
        [("public", "counter", ["select", "insert"])], create_schemas=("public",)))


def pid_of(http: httpx.Client, account: Account, token: str | None) -> int:
    response = account.sql(http, "SELECT pg_backend_pid() AS pid", token)
    assert response.status_code == 200, response.text
    return int(response.json()["rows"][0]["pid"])


def sql_or_cut(http: httpx.Client, account: Account, query: str,
               token: str | None) -> int:
    """The status, or 0 if a streamed answer was cut short (an error after its first bytes:
    by design the connection is dropped without the final chunk)."""
    try:
        return account.sql(http, query, token).status_code
    except httpx.RemoteProtocolError:
        return 0


CLEAN_CHECK = (
    "SELECT current_setting('search_path') AS p, current_setting('statement_timeout') AS t,"
    " current_user = session_user AS same_role,"
    " (SELECT count(*) FROM pg_prepared_statements) AS prepared,"
    " (SELECT count(*) FROM pg_cursors WHERE name <> '') AS cursors,"
    " (SELECT count(*) FROM pg_listening_channels()) AS listening,"
    " (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()) AS temps,"
    " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
    "    AND pid = pg_backend_pid()) AS advisory,"
    " current_setting('transaction_read_only') AS ro,"
    " current_setting('client_encoding') AS enc, 'é' AS accent")


def wait_until_lock_free(admin_url: str, database: str, lock: int, timeout: float) -> None:
    """Poll until no session holds the advisory lock; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(admin_url, dbname=database, autocommit=True) as other:
        while True:
            free = other.execute("SELECT NOT EXISTS (SELECT 1 FROM pg_locks WHERE"
                                 " locktype = 'advisory' AND objid = %s)", [lock]).fetchone()
            if free == (True,):
                return
            assert time.monotonic() < deadline, f"advisory lock {lock} still held"
            time.sleep(0.1)


def assert_clean(http: httpx.Client, account: Account, token: str | None,
                 admin_url: str | None = None, lock: int | None = None) -> None:
    """The session the next request gets shows nothing of the earlier ones."""
    state = account.sql(http, CLEAN_CHECK, token)
    assert state.status_code == 200, state.text
    assert state.json()["rows"] == [{
        "p": DEFAULT_PATH, "t": "0", "same_role": True, "prepared": 0, "cursors": 0,
        "listening": 0, "temps": 0, "advisory": 0, "ro": "off", "enc": "UTF8",
        "accent": "é"}]
    if admin_url is not None and lock is not None:
        # a session closed rather than reset ends asynchronously (its backend drops its
        # temporary tables before it lets go of its locks); one kept in a pool never does
        wait_until_lock_free(admin_url, account.user.database, lock, timeout=30.0)


# --- single statements (pipelined reset) --------------------------------------------------

@pytest.mark.parametrize("query", [
    "START TRANSACTION READ ONLY",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "SELECT set_config('default_transaction_read_only', 'on', false) AS x",
    "SELECT set_config('client_encoding', 'LATIN1', false) AS x",
    "SET client_encoding TO 'SQL_ASCII'",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "LISTEN somewhere",
    "SELECT pg_advisory_lock(515151) AS l",
    "SELECT set_config('statement_timeout', '1', false) AS x",
    "SET ROLE NONE",
    "DO $$ BEGIN EXECUTE 'LISTEN ch'; PERFORM pg_notify('ch', 'x'); END $$",
    "DO $$ BEGIN PERFORM pg_advisory_lock(515151); RAISE EXCEPTION 'boom'; END $$",
    "DO $$ BEGIN PERFORM set_config('search_path', 'pg_catalog', false);"
    " CREATE TEMP TABLE t (x int); EXECUTE 'PREPARE p AS SELECT 1'; END $$",
    "SAVEPOINT s",
    "COMMIT AND CHAIN",
    "-- only a comment",
    ";",
    "",
])
def test_single_statement_leaves_nothing_and_no_500(
    account: Account, key: KeyHandle, admin_url: str, query: str,
) -> None:
    with httpx.Client(timeout=30) as http:
        pid_of(http, account, key.token)
        response = account.sql(http, query, key.token)
        assert response.status_code < 500, response.text
        assert_clean(http, account, key.token, admin_url, 515151)
        assert account.sql(http, "INSERT INTO counter VALUES (1)", key.token).status_code == 200


def test_statement_timeout_that_makes_the_pipelined_discard_fail_is_not_reused_dirty(
    account: Account, key: KeyHandle, admin_url: str,
) -> None:
    """Many temp tables and a 1 ms statement_timeout: the DISCARD ALL behind the query is
    cancelled (its advisory-lock release is not transactional, the rest rolls back)."""
    query = ("DO $$ BEGIN FOR i IN 1..400 LOOP EXECUTE format('CREATE TEMP TABLE t%s (x int)', i);"
             " END LOOP; PERFORM pg_advisory_lock(616161);"
             " PERFORM set_config('search_path', 'pg_catalog', false);"
             " PERFORM set_config('statement_timeout', '1', false); END $$")
    with httpx.Client(timeout=60) as http:
        pid_of(http, account, key.token)
        response = account.sql(http, query, key.token)
        assert response.status_code == 200, response.text
        for _ in range(3):
            assert_clean(http, account, key.token, admin_url, 616161)


def test_terminating_its_own_session_answers_no_500_and_does_not_hang(
    account: Account, key: KeyHandle,
) -> None:
    with httpx.Client(timeout=20) as http:
        pid = pid_of(http, account, key.token)
        response = account.sql(http, "SELECT pg_terminate_backend(pg_backend_pid())", key.token)
        assert response.status_code < 500 or response.status_code == 503, response.text
        assert pid_of(http, account, key.token) != pid
        assert_clean(http, account, key.token)


def test_cancelling_its_own_statement_is_not_reused_dirty(
    account: Account, key: KeyHandle,
) -> None:
    with httpx.Client(timeout=20) as http:
        pid_of(http, account, key.token)
        response = account.sql(
            http, f"{MARK}, pg_cancel_backend(pg_backend_pid()) AS c", key.token)
        assert response.status_code < 500, response.text
        assert_clean(http, account, key.token)


def test_terminating_a_sibling_idle_session_is_noticed(
    account: Account, key: KeyHandle,
) -> None:
    with httpx.Client(timeout=20) as first, httpx.Client(timeout=20) as second:
        pid_of(first, account, key.token)
        pid_of(second, account, key.token)
        for http in (first, second):
            response = account.sql(
                http, "SELECT pg_terminate_backend(pid) AS t FROM pg_stat_activity"
                " WHERE usename = current_user AND pid <> pg_backend_pid()", key.token)
            assert response.status_code == 200, response.text
        for http in (first, second):
            assert_clean(http, account, key.token)


# --- large results, streamed ---------------------------------------------------------------

@pytest.mark.parametrize("rows", [1999, 2000, 2001, 4000, 6500])
def test_large_results_at_batch_boundaries_reset_the_session(
    account: Account, key: KeyHandle, admin_url: str, rows: int,
) -> None:
    query = (f"SELECT g, set_config('search_path', 'pg_catalog', false) AS s,"
             f" pg_advisory_lock(717171) AS l FROM generate_series(1, {rows}) g")
    with httpx.Client(timeout=30) as http:
        pid = pid_of(http, account, key.token)
        response = account.sql(http, query, key.token)
        assert response.status_code == 200
        assert len(response.json()["rows"]) == rows
        assert pid_of(http, account, key.token) == pid
        assert_clean(http, account, key.token, admin_url, 717171)


def error_mid_stream(account: Account, key: KeyHandle, admin_url: str, column: str,
                     lock: int, checks: int = 1) -> None:
    """A 5,000-row stream whose first column fails at some row, after the session's state
    was changed: no 500, and every later request finds the session clean."""
    query = (f"SELECT {column}, set_config('search_path', 'pg_catalog', false) AS s,"
             f" pg_advisory_lock({lock}) AS l FROM generate_series(1, 5000) g")
    with httpx.Client(timeout=30) as http:
        pid_of(http, account, key.token)
        assert sql_or_cut(http, account, query, key.token) < 500
        for _ in range(checks):
            assert_clean(http, account, key.token, admin_url, lock)


@pytest.mark.parametrize("where", [1, 2500, 4001])
def test_server_error_mid_stream_resets_the_session(
    account: Account, key: KeyHandle, admin_url: str, where: int,
) -> None:
    error_mid_stream(account, key, admin_url,
                     f"CASE WHEN g = {where} THEN 1 / 0 ELSE g END AS g", 818181)


@pytest.mark.parametrize("where", [1, 2500])
def test_client_side_load_error_mid_stream_resets_the_session(
    account: Account, key: KeyHandle, admin_url: str, where: int,
) -> None:
    """psycopg cannot load 'infinity' as a Python date: a psycopg error raised by the row
    loader while the query's own results are still unread."""
    error_mid_stream(account, key, admin_url, f"CASE WHEN g = {where} THEN 'infinity'::date "
                     "ELSE current_date END AS d", 919191)


@pytest.mark.parametrize("where", [1, 2500])
def test_non_psycopg_loader_error_mid_stream_leaves_no_pipeline_behind(
    account: Account, key: KeyHandle, admin_url: str, where: int,
) -> None:
    """Deeply nested JSON: Python's json.loads raises RecursionError (not a psycopg.Error)
    with the pipeline still open and the DISCARD ALL's answer unread."""
    deep = "(repeat('[', 5000) || repeat(']', 5000))::jsonb"
    error_mid_stream(account, key, admin_url,
                     f"CASE WHEN g = {where} THEN {deep} ELSE '1'::jsonb END AS j", 929292,
                     checks=3)


def test_client_disconnecting_mid_stream_leaves_nothing(
    account: Account, key: KeyHandle, admin_url: str,
) -> None:
    query = ("SELECT g, repeat('x', 200) AS pad,"
             " set_config('search_path', 'pg_catalog', false) AS s,"
             " pg_advisory_lock(939393) AS l FROM generate_series(1, 200000) g")
    url = urlsplit(account.sql_url)
    target = f"{url.path}?{urlencode({'q': query, 'api_key': key.token})}"
    for _ in range(2):
        with socket.create_connection((url.hostname, url.port), timeout=10) as raw:
            raw.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            assert raw.recv(4096)
    time.sleep(1.5)
    for _ in range(4):  # fresh connections: either worker
        with httpx.Client(timeout=30) as http:
            assert_clean(http, account, key.token, admin_url, 939393)


def test_time_limit_after_setting_state_is_not_reused_dirty(
    account: Account, key: KeyHandle,
) -> None:
    with httpx.Client(timeout=30) as http:
        pid_of(http, account, key.token)
        response = account.sql(http, f"{MARK}, pg_sleep(60) AS z", key.token)
        assert response.status_code == 429
        assert_clean(http, account, key.token)


def test_time_limit_during_a_slow_stream_is_not_reused_dirty(
    account: Account, key: KeyHandle,
) -> None:
    """Rows come slowly (the time limit lands while the stream is between batches)."""
    query = ("SELECT g, set_config('search_path', 'pg_catalog', false) AS s,"
             " CASE WHEN g % 2000 = 0 THEN pg_sleep(1) END AS z FROM generate_series(1, 12000) g")
    with httpx.Client(timeout=30) as http:
        pid_of(http, account, key.token)
        assert sql_or_cut(http, account, query, key.token) in (0, 200, 429)
        assert_clean(http, account, key.token)


# --- several statements (simple-protocol fallback) ----------------------------------------

@pytest.mark.parametrize("query", [
    "SET search_path TO pg_catalog; CREATE TEMP TABLE t (x int); PREPARE p AS SELECT 1;"
    " DECLARE c CURSOR WITH HOLD FOR SELECT 1; LISTEN ch; SELECT pg_advisory_lock(525252)",
    "SELECT pg_advisory_lock(525252); BEGIN",
    "SELECT pg_advisory_lock(525252); BEGIN; SELECT 1/0",
    "SET statement_timeout = 1; SELECT pg_advisory_lock(525252)",
    "LISTEN ch; NOTIFY ch, 'hello'; SELECT 1",
    "SET client_encoding = 'LATIN1'; SELECT 'é' AS e",
    "SET search_path TO pg_catalog; SELECT g FROM generate_series(1, 5000) g",
    "SET search_path TO pg_catalog; COPY (SELECT 1) TO STDOUT",
])
def test_several_statements_leave_nothing(
    account: Account, key: KeyHandle, admin_url: str, query: str,
) -> None:
    with httpx.Client(timeout=30) as http:
        pid_of(http, account, key.token)
        response = account.sql(http, query, key.token)
        assert response.status_code < 500, response.text
        for _ in range(2):
            assert_clean(http, account, key.token, admin_url, 525252)


# --- the shared default_public key and the master key -------------------------------------

@pytest.mark.parametrize("query", [
    "SELECT set_config('search_path', 'pg_catalog', false) AS s",
    "PREPARE p AS SELECT 1",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "SET search_path TO pg_catalog; CREATE TEMP TABLE t (x int)",
    "SELECT pg_advisory_lock(535353) AS l",
])
def test_anonymous_requests_share_nothing(
    account: Account, admin_url: str, query: str,
) -> None:
    with httpx.Client(timeout=30) as http:
        pid_of(http, account, None)
        response = account.sql(http, query, None)
        assert response.status_code < 500, response.text
        assert_clean(http, account, None, admin_url, 535353)


def test_master_key_state_does_not_leak(account: Account, admin_url: str) -> None:
    with httpx.Client(timeout=30) as http:
        token = account.master_token
        pid_of(http, account, token)
        for query in ("SELECT set_config('search_path', 'pg_catalog', false) AS s",
                      "CREATE TEMP TABLE t AS SELECT 1 AS x", "BEGIN",
                      "SET ROLE NONE; SET search_path TO pg_catalog"):
            response = account.sql(http, query, token)
            assert response.status_code < 500, response.text
            assert_clean(http, account, token, admin_url, 1)


# --- reported parameters (ParameterStatus) read back with the pipelined reset -----------

@pytest.mark.parametrize("query", [
    "SET DateStyle TO 'SQL, DMY'",
    "SET IntervalStyle TO 'sql_standard'",
    "SET TimeZone TO 'Asia/Tokyo'",
    "SELECT set_config('DateStyle', 'German', false) AS x",
    "SET DateStyle TO 'SQL, DMY'; SET IntervalStyle TO 'postgres_verbose'; SELECT 1",
])
def test_reported_parameters_are_back_to_defaults(
    account: Account, key: KeyHandle, query: str,
) -> None:
    probe = ("SELECT DATE '2024-03-01' AS d, INTERVAL '1 day 2 hours' AS i,"
             " current_setting('TimeZone') AS tz")
    with httpx.Client(timeout=30) as http:
        before = account.sql(http, probe, key.token).json()["rows"]
        assert account.sql(http, query, key.token).status_code == 200
        assert account.sql(http, probe, key.token).json()["rows"] == before
        assert_clean(http, account, key.token)


def test_custom_placeholder_values_do_not_leak(account: Account) -> None:
    with httpx.Client(timeout=30) as http:
        pid = pid_of(http, account, None)
        assert account.sql(http, "SELECT set_config('app.secret', 's3cr3t', false) AS x",
                           None).status_code == 200
        assert pid_of(http, account, None) == pid
        seen = account.sql(http, "SELECT current_setting('app.secret', true) AS v", None)
        assert seen.json()["rows"][0]["v"] in (None, "")


@pytest.mark.parametrize("setting,value,probe,expected", [
    ("search_path", "pg_catalog", "current_setting('search_path')", DEFAULT_PATH),
    ("TimeZone", "'Asia/Tokyo'", "current_setting('TimeZone')", None),
    ("standard_conforming_strings", "off", "'a\\b'", "a\\b"),
    ("client_min_messages", "error", "current_setting('client_min_messages')", "notice"),
])
@pytest.mark.parametrize("token_kind", ["anonymous", "key"])
def test_role_level_defaults_planted_by_a_request_reach_no_later_session(
    account: Account, key: KeyHandle, token_kind: str, setting: str, value: str,
    probe: str, expected: str | None,
) -> None:
    """Not the pipelined reset itself: a role's own `ALTER ROLE CURRENT_USER SET` is a
    session default DISCARD ALL restores, so unless grantkey pins the setting at login it
    reaches every later session of the key (for default_public: every anonymous client)."""
    token = None if token_kind == "anonymous" else key.token
    with httpx.Client(timeout=30) as http:
        before = account.sql(http, f"SELECT {probe} AS v", token).json()["rows"][0]["v"]
        planted = account.sql(
            http, f"ALTER ROLE CURRENT_USER SET {setting} = {value}", token)
        try:
            # every session of the role ends: the next request logs in afresh
            account.sql(http, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE usename = current_user AND pid <> pg_backend_pid()", token)
            account.sql(http, "SELECT pg_terminate_backend(pg_backend_pid())", token)
            with httpx.Client(timeout=30) as later:
                seen = account.sql(later, f"SELECT {probe} AS v", token)
            assert (planted.status_code >= 400 or seen.json()["rows"] == [
                {"v": expected if expected is not None else before}]), seen.text
        finally:
            if planted.status_code < 400:
                account.sql(http, "ALTER ROLE CURRENT_USER RESET ALL", token)


# --- the time limit landing on a slow DISCARD ALL ----------------------------------------

def test_time_limit_landing_on_a_slow_pipelined_discard(
    account: Account, key: KeyHandle, admin_url: str,
) -> None:
    """The query ends just before the time limit; its DISCARD ALL (dropping many temporary
    tables) is what the cancel hits."""
    query = ("DO $$ BEGIN FOR i IN 1..1500 LOOP"
             " EXECUTE format('CREATE TEMP TABLE t%s (x int)', i); END LOOP;"
             " PERFORM pg_advisory_lock(545454);"
             " PERFORM set_config('search_path', 'pg_catalog', false);"
             " PERFORM pg_sleep(greatest(0, 2.9 - extract(epoch FROM clock_timestamp()"
             "   - statement_timestamp()))); END $$")
    with httpx.Client(timeout=60) as http:
        pid_of(http, account, key.token)
        assert sql_or_cut(http, account, query, key.token) in (200, 429)
        for _ in range(3):
            assert_clean(http, account, key.token, admin_url, 545454)


def test_a_sibling_cancelling_every_same_role_backend_breaks_no_reset(
    account: Account, key: KeyHandle, admin_url: str,
) -> None:
    """Anonymous clients share one role: one can cancel the others' statements (and so
    their pipelined DISCARD ALL). The victim's session must not come back dirty."""
    victim_query = ("DO $$ BEGIN FOR i IN 1..800 LOOP"
                    " EXECUTE format('CREATE TEMP TABLE v%s (x int)', i); END LOOP;"
                    " PERFORM pg_advisory_lock(555555);"
                    " PERFORM set_config('search_path', 'pg_catalog', false); END $$")
    canceller = ("SELECT count(pg_cancel_backend(pid)) AS n FROM pg_stat_activity"
                 " WHERE usename = current_user AND pid <> pg_backend_pid()"
                 " AND state = 'active'")
    import threading
    stop = threading.Event()
    cancelling = threading.Lock()  # held by each cancel; the check holds it so as not to be cancelled

    def cancel_loop() -> None:
        with httpx.Client(timeout=30) as other:
            while not stop.is_set():
                with cancelling:
                    account.sql(other, canceller, None)
                time.sleep(0.005)

    thread = threading.Thread(target=cancel_loop)
    thread.start()
    try:
        with httpx.Client(timeout=30) as http:
            for _ in range(8):
                assert sql_or_cut(http, account, victim_query, None) < 500
                with cancelling:  # the victim's session is checked, not cancelled in turn
                    assert_clean(http, account, None)
    finally:
        stop.set()
        thread.join()
    with httpx.Client(timeout=30) as http:
        for _ in range(3):
            assert_clean(http, account, None, admin_url, 555555)


# --- errors raised at the query's own Sync (its implicit commit) --------------------------

@pytest.fixture
def deferred(account: Account, owner_sql: Callable[[Account, str], None],
             make_key: Callable[..., KeyHandle]) -> KeyHandle:
    owner_sql(account, "CREATE TABLE uniq (n int UNIQUE DEFERRABLE INITIALLY DEFERRED);"
                       " INSERT INTO uniq VALUES (1)")
    return make_key(account, "deferrer", table_grants(
        [("public", "uniq", ["select", "insert"])], create_schemas=("public",)))


@pytest.mark.parametrize(("query", "outcome"), [
    ("INSERT INTO uniq VALUES (1)", "400"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1 / 0", "400"),
    # more rows than the first batch: the answer has begun when the commit fails, so it is
    # cut short (never complete-looking), as for any error after the first bytes
    ("INSERT INTO uniq SELECT 1 FROM generate_series(1, 3000) RETURNING n", "cut"),
])
def test_error_at_the_implicit_commit_is_not_answered_as_success(
    account: Account, deferred: KeyHandle, admin_url: str, query: str, outcome: str,
) -> None:
    """Was a break (before the pipelined reset too): a deferred constraint failing at the
    statement's implicit commit came after its result and was dropped: 200, nothing
    committed."""
    with httpx.Client(timeout=30) as http:
        if outcome == "cut":
            with pytest.raises(httpx.RemoteProtocolError):
                account.sql(http, query, deferred.token)
        else:
            response = account.sql(http, query, deferred.token)
            assert response.status_code == 400, response.text[:300]
    with httpx.Client(timeout=30) as http:
        assert_clean(http, account, deferred.token)
    with psycopg.connect(admin_url, dbname=account.user.database) as other:
        assert other.execute("SELECT count(*) FROM uniq").fetchone() == (1,)


# --- odd query texts ----------------------------------------------------------------------

@pytest.mark.parametrize("query", [
    "/* /* nested */ */ COPY counter FROM STDIN",
    "/* /* nested */ */ COPY (SELECT g FROM generate_series(1, 5000) g) TO STDOUT",
    "SELECT 1; /* /* nested */ */ COPY counter FROM STDIN",
    "SELECT 'x\\''; COPY counter FROM STDIN; SELECT ''",
])
def test_hidden_copy_leaves_no_session_in_pipeline_or_copy_mode(
    account: Account, key: KeyHandle, query: str,
) -> None:
    with httpx.Client(timeout=30) as http:
        response = account.sql(http, query, key.token)
        assert response.status_code < 500, response.text[:300]
        for _ in range(2):
            assert_clean(http, account, key.token)


@pytest.mark.parametrize("text", ["SELECT '\\ud800' AS x", "SELECT 1 AS x\\u0000; SELECT 2",
                                  "SELECT 1 AS x\\u0000"])
def test_unencodable_query_text_answers_no_500(
    account: Account, key: KeyHandle, text: str,
) -> None:
    with httpx.Client(timeout=30) as http:
        body = '{"q": "' + text + '", "api_key": "' + key.token + '"}'  # JSON escapes kept raw
        response = http.post(account.sql_url, content=body.encode(),
                             headers={"Content-Type": "application/json"})
        assert response.status_code < 500, response.text[:300]
        assert_clean(http, account, key.token)


@pytest.mark.parametrize("after", [0.2, 0.5, 0.9])
def test_client_leaving_while_the_pipelined_discard_runs(
    account: Account, key: KeyHandle, admin_url: str, after: float,
) -> None:
    """A query that ends after ~0.5 s with a DISCARD ALL that takes a while (many temporary
    tables): the client goes away around the end of the query."""
    query = ("DO $$ BEGIN FOR i IN 1..1200 LOOP"
             " EXECUTE format('CREATE TEMP TABLE q%s (x int)', i); END LOOP;"
             " PERFORM pg_advisory_lock(565656);"
             " PERFORM set_config('search_path', 'pg_catalog', false); END $$")
    url = urlsplit(account.sql_url)
    target = f"{url.path}?{urlencode({'q': query, 'api_key': key.token})}"
    with socket.create_connection((url.hostname, url.port), timeout=10) as raw:
        raw.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        time.sleep(after)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    for _ in range(4):
        with httpx.Client(timeout=30) as http:
            assert_clean(http, account, key.token, admin_url, 565656)


def test_planted_backslash_strings_then_a_copy_the_text_check_misreads(
    account: Account, key: KeyHandle,
) -> None:
    """With standard_conforming_strings off as the role's default (planted by an earlier
    request), `'x\\''` ends where the COPY check thinks a string goes on: the COPY reaches
    PostgreSQL (simple-protocol fallback) and only the backstop stops it."""
    hidden = "SELECT 'x\\''; COPY counter FROM STDIN; SELECT ''"
    with httpx.Client(timeout=30) as http:
        planted = account.sql(
            http, "ALTER ROLE CURRENT_USER SET standard_conforming_strings = off", key.token)
        try:
            account.sql(http, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE usename = current_user AND pid <> pg_backend_pid()", key.token)
            account.sql(http, "SELECT pg_terminate_backend(pg_backend_pid())", key.token)
            with httpx.Client(timeout=10) as later:
                response = account.sql(later, hidden, key.token)
                assert response.status_code == 400, response.text[:300]
                # the session is left in no COPY or pipeline mode
                ok = account.sql(later, "SELECT 1 AS one", key.token)
                assert ok.json()["rows"] == [{"one": 1}], ok.text
        finally:
            if planted.status_code < 400:
                account.sql(http, "ALTER ROLE CURRENT_USER RESET ALL", key.token)
