"""Attacks on the COPY endpoints (carto-compat.md §9): /api/v2/sql/copyfrom and copyto.

As a regular key, the default public key (no key), an unknown key, or a tenant's master:
reaching the server's files and programs, smuggling a second statement, writing through a
COPY TO, escaping the key's role, leaving a pooled session dirty, exhausting the server's
memory, connections or time, outliving a revocation, and bad input that could make a 500.
Tests that pass document a defence; a strict xfail is a finding.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import os
import select
import socket
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlencode, urlsplit

import httpx
import orjson
import psycopg
import pytest

from tests.conftest import Account, KeyHandle
from tests.support import ServerProcess

CSV_IN = "COPY cities (name, population) FROM STDIN WITH (FORMAT csv)"
IDS_IN = "COPY ids (id, pad) FROM STDIN WITH (FORMAT csv)"
# a COPY TO whose output never ends in a test's time (about 10 GB)
ENDLESS = "COPY (SELECT generate_series(1, 100000000), repeat('x', 100)) TO STDOUT"


# --- fixtures and helpers --------------------------------------------------------------


def copy_url(base: str, account: Account, direction: str) -> str:
    return f"{base}/user/{account.username}/api/v2/sql/copy{direction}"


def sql_url(base: str, account: Account) -> str:
    return f"{base}/user/{account.username}/api/v2/sql"


def rows_of(base: str, account: Account, q: str, token: str | None) -> list[dict[str, object]]:
    params = {"q": q} if token is None else {"q": q, "api_key": token}
    answer = httpx.get(sql_url(base, account), params=params, timeout=30)
    assert answer.status_code == 200, answer.text
    rows: list[dict[str, object]] = answer.json()["rows"]
    return rows


def count(base: str, account: Account, table: str = "cities") -> int:
    rows = rows_of(base, account, f"SELECT count(*) AS n FROM {table}", account.master_token)
    return int(str(rows[0]["n"]))


def busy_sessions(admin_url: str, role: str) -> list[tuple[object, ...]]:
    """The role's sessions that are doing something (not plain idle)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT state, left(query, 80) FROM pg_catalog.pg_stat_activity "
            "WHERE usename = %s AND state IS DISTINCT FROM 'idle'", [role]).fetchall()


def wait_quiet(admin_url: str, role: str, seconds: float) -> float:
    """Wait until no session of `role` is busy: how long it took (fails after `seconds`)."""
    started = time.monotonic()
    while busy := busy_sessions(admin_url, role):
        waited = time.monotonic() - started
        assert waited < seconds, f"sessions of the role still busy after {waited:.1f} s: {busy}"
        time.sleep(0.1)
    return time.monotonic() - started


def wait_busy(admin_url: str, role: str, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not busy_sessions(admin_url, role):
        assert time.monotonic() < deadline, "the role's COPY never started"
        time.sleep(0.05)


def serves_cleanly(base: str, account: Account, key: KeyHandle) -> None:
    """Each of the key's pooled sessions (several requests) is as fresh as a new one: its
    own role, the default settings, no advisory lock, no open transaction."""
    probe = ("SELECT current_user AS cu, session_user AS su, "
             "current_setting('statement_timeout') AS st, "
             "current_setting('search_path') AS sp, "
             "coalesce(current_setting('gk.mark', true), '') AS mark, "
             "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
             "AND pid = pg_backend_pid()) AS advisory")
    with key.connect() as fresh:
        row = fresh.execute(probe).fetchone()
    assert row is not None
    expected = dict(zip(["cu", "su", "st", "sp", "mark", "advisory"], row, strict=True))
    assert expected["cu"] == key.role and expected["st"] != "123s"
    for _ in range(6):
        assert rows_of(base, account, probe, key.token) == [expected]


def connect(base: str) -> socket.socket:
    address = urlsplit(base)
    assert address.hostname is not None and address.port is not None
    return socket.create_connection((address.hostname, address.port), timeout=30)


def open_upload(base: str, account: Account, token: str | None, q: str = CSV_IN,
                headers: str = "") -> socket.socket:
    """A chunked copyfrom whose body is sent by hand."""
    params = {"q": q} if token is None else {"q": q, "api_key": token}
    sock = connect(base)
    sock.sendall(f"POST /user/{account.username}/api/v2/sql/copyfrom?{urlencode(params)} "
                 f"HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n{headers}\r\n".encode())
    return sock


def send_chunk(sock: socket.socket, data: bytes) -> None:
    sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))


def end_body(sock: socket.socket) -> None:
    sock.sendall(b"0\r\n\r\n")


def answer_of(sock: socket.socket, seconds: float = 20) -> bytes:
    """An answer with a JSON body (read until its closing brace, or the connection's end)."""
    sock.settimeout(seconds)
    answer = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                break
    return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def json_of(answer: bytes) -> object:
    body = answer.split(b"\r\n\r\n", 1)[1]
    if b"transfer-encoding: chunked" in answer.split(b"\r\n\r\n", 1)[0].lower():
        body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0].rstrip(b"\r\n")
    return orjson.loads(body)


def raw_request(base: str, head: bytes, body: bytes = b"", seconds: float = 10) -> bytes:
    """One request as raw bytes; the whole answer (until the server closes, or quiet)."""
    with connect(base) as sock:
        sock.sendall(head + body)
        sock.settimeout(seconds)
        answer = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer:
                    head_part, rest = answer.split(b"\r\n\r\n", 1)
                    length = [line for line in head_part.lower().split(b"\r\n")
                              if line.startswith(b"content-length:")]
                    if length and len(rest) >= int(length[0].split(b":")[1]):
                        break
        return answer


def get_raw(base: str, target: str) -> bytes:
    """A GET of `target` as it is (no client rewrites it), on a connection of its own."""
    return raw_request(base, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                       .encode())


def healthy(base: str) -> None:
    assert httpx.get(base + "/health", timeout=10).status_code == 200


def assert_error_shape(answer: httpx.Response, *statuses: int) -> str:
    assert answer.status_code in statuses, (answer.status_code, answer.text)
    body = answer.json()
    assert isinstance(body["error"], list) and isinstance(body["error"][0], str), body
    assert "Traceback" not in answer.text
    message: str = body["error"][0]
    return message


def rss_bytes(server: ServerProcess) -> int:
    """Resident memory of the server and its processes."""
    total = 0
    for pid in [server.process.pid, *server.children()]:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


# --- the server's files and programs ---------------------------------------------------


def marker() -> str:
    return f"/tmp/grantkey-copy-pwned-{uuid.uuid4().hex}"


FILE_ATTEMPTS = [
    ("from", "COPY cities FROM '/etc/passwd'"),
    ("from", "COPY cities FROM PROGRAM 'touch {marker}'"),
    ("from", "COPY cities TO '{marker}'"),
    ("from", "COPY cities TO PROGRAM 'touch {marker}'"),
    ("to", "COPY cities TO '{marker}'"),
    ("to", "COPY (SELECT 1) TO PROGRAM 'touch {marker}'"),
    ("to", "COPY cities FROM '/etc/passwd'"),
    ("to", "COPY cities FROM PROGRAM 'touch {marker}'"),
    ("to", "COPY (SELECT pg_read_file('/etc/passwd')) TO STDOUT"),
    ("to", "COPY (SELECT pg_ls_dir('.')) TO STDOUT"),
    ("to", "COPY (SELECT lo_import('/etc/passwd')) TO STDOUT"),
    ("to", "COPY (SELECT pg_read_binary_file('/etc/hostname')) TO STDOUT"),
]


@pytest.mark.parametrize("who", ["regular", "public", "master"])
@pytest.mark.parametrize(("direction", "attempt"), FILE_ATTEMPTS)
def test_copy_never_reaches_the_servers_files_or_programs(
        account: Account, loader: KeyHandle, http: httpx.Client, who: str, direction: str,
        attempt: str) -> None:
    path = marker()
    token = {"regular": loader.token, "public": None, "master": account.master_token}[who]
    params = {"q": attempt.format(marker=path)}
    if token is not None:
        params["api_key"] = token
    if direction == "from":
        answer = http.post(copy_url(account.base_url, account, "from"), params=params,
                           content=b"x,1\n")
    else:
        answer = http.get(copy_url(account.base_url, account, "to"), params=params)
    assert_error_shape(answer, 400, 403)
    assert "root:" not in answer.text
    assert not os.path.exists(path)
    assert count(account.base_url, account) == 2


# --- a second statement, replication, writes through COPY TO ---------------------------


@pytest.mark.parametrize("tail", ["; DELETE FROM cities", ";\nDROP TABLE cities",
                                  "; SELECT set_config('role', 'postgres', false)",
                                  " \\; DELETE FROM cities", ";;DELETE FROM cities"])
def test_a_second_statement_never_runs_even_for_the_master(
        account: Account, loader: KeyHandle, http: httpx.Client, tail: str) -> None:
    params = {"api_key": account.master_token}
    upload = http.post(copy_url(account.base_url, account, "from"),
                       params={**params, "q": CSV_IN + tail}, content=b"Cusco,4\n")
    assert_error_shape(upload, 400)
    download = http.get(copy_url(account.base_url, account, "to"),
                        params={**params, "q": "COPY cities TO STDOUT" + tail})
    assert_error_shape(download, 400)
    assert count(account.base_url, account) == 2


@pytest.mark.parametrize("who", ["regular", "master"])
@pytest.mark.parametrize("q", [
    "COPY (SELECT pg_create_logical_replication_slot('gk_evil', 'test_decoding')) TO STDOUT",
    "COPY (SELECT pg_create_physical_replication_slot('gk_evil')) TO STDOUT",
    "COPY (SELECT * FROM pg_logical_slot_get_changes('gk_evil', NULL, NULL)) TO STDOUT",
    "COPY (SELECT pg_replication_origin_create('gk_evil')) TO STDOUT",
    "COPY (SELECT * FROM pg_stat_replication) TO STDOUT WITH (FORMAT binary)",
])
def test_replication_through_copy_is_refused(
        account: Account, loader: KeyHandle, http: httpx.Client, admin_url: str, who: str,
        q: str) -> None:
    token = loader.token if who == "regular" else account.master_token
    answer = http.get(copy_url(account.base_url, account, "to"), params={"api_key": token, "q": q})
    if "pg_stat_replication" in q:  # a view any role may read: its rows are hidden
        assert answer.status_code == 200, answer.text
        assert answer.content.endswith(b"\xff\xff")  # the binary trailer: no row
        return
    assert_error_shape(answer, 400, 403)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots "
                            "WHERE slot_name = 'gk_evil'").fetchone() == (0,)


@pytest.mark.parametrize("q", [
    "COPY (DELETE FROM cities RETURNING *) TO STDOUT",
    "COPY (UPDATE cities SET population = 0 RETURNING *) TO STDOUT",
    "COPY (INSERT INTO secrets VALUES ('planted') RETURNING *) TO STDOUT",
    "COPY (DELETE FROM secrets RETURNING *) TO STDOUT",
    "COPY (MERGE INTO cities c USING (SELECT 1) s ON true WHEN MATCHED THEN DELETE "
    "RETURNING c.*) TO STDOUT",
    "COPY (WITH gone AS (DELETE FROM cities RETURNING *) SELECT * FROM gone) TO STDOUT",
])
@pytest.mark.parametrize("who", ["regular", "public"])
def test_a_copy_to_cannot_write_what_the_key_may_not(
        account: Account, loader: KeyHandle, http: httpx.Client, who: str, q: str) -> None:
    public = http.patch(f"{account.base_url}/user/{account.username}/api/v4/datasets/cities",
                        params=account.master(), json={"privacy": "public"})
    assert public.status_code == 200, public.text
    params = {"q": q} if who == "public" else {"q": q, "api_key": loader.token}
    answer = http.get(copy_url(account.base_url, account, "to"), params=params)
    assert_error_shape(answer, 400, 403)
    rows = rows_of(account.base_url, account, "SELECT * FROM cities ORDER BY name",
                   account.master_token)
    assert rows == [{"name": "Lima", "population": 10}, {"name": "Quito", "population": 3}]
    assert rows_of(account.base_url, account, "SELECT s FROM secrets",
                   account.master_token) == [{"s": "hush"}]


@pytest.mark.parametrize(("direction", "q"), [
    ("from", ENDLESS),
    ("to", "COPY cities FROM STDIN"),
])
def test_a_copy_the_other_way_is_ended_at_once(
        account: Account, loader: KeyHandle, http: httpx.Client, admin_url: str,
        direction: str, q: str) -> None:
    """An endless COPY TO sent to copyfrom (and a COPY FROM to copyto): a 400 at once, the
    COPY ended, not run to the COPY time limit."""
    started = time.monotonic()
    params = {"api_key": loader.token, "q": q}
    if direction == "from":
        answer = http.post(copy_url(account.base_url, account, "from"), params=params,
                           content=b"Cusco,4\n")
    else:
        answer = http.get(copy_url(account.base_url, account, "to"), params=params)
    assert assert_error_shape(answer, 400).startswith(f"copy{direction} runs COPY")
    assert time.monotonic() - started < 3
    wait_quiet(admin_url, loader.role, 2)
    assert count(account.base_url, account) == 2


def test_a_slow_copy_to_sent_to_copyfrom_is_ended_within_the_sql_time_limit(
        harsh: ServerProcess, account: Account, loader: KeyHandle, admin_url: str) -> None:
    started = time.monotonic()
    answer = httpx.post(copy_url(harsh.url, account, "from"), content=b"Cusco,4\n", params={
        "api_key": loader.token, "q": "COPY (SELECT pg_sleep(60)) TO STDOUT"}, timeout=30)
    answered_after = time.monotonic() - started
    assert answer.status_code in (400, 429), answer.text
    assert answered_after < 4.5, f"answered after {answered_after:.1f} s (SQL limit: 3 s)"
    wait_quiet(admin_url, loader.role, 2)


@pytest.mark.parametrize("q", ["COPY (SELECT $1::text) TO STDOUT", "COPY (SELECT $1) TO STDOUT",
                               "COPY cities FROM STDIN WHERE population > $1"])
def test_parameter_placeholders_are_a_400(
        account: Account, loader: KeyHandle, http: httpx.Client, q: str) -> None:
    """The extended protocol sends no parameters: a placeholder is PostgreSQL's error."""
    answer = http.get(copy_url(account.base_url, account, "to"),
                      params={"api_key": loader.token, "q": q})
    assert_error_shape(answer, 400)
    answer = http.post(copy_url(account.base_url, account, "from"), content=b"Cusco,4\n",
                       params={"api_key": loader.token, "q": q})
    assert_error_shape(answer, 400)


def test_other_tenants_data_is_out_of_reach(
        account: Account, loader: KeyHandle, http: httpx.Client,
        make_account: Callable[[], Account], owner_sql: Callable[[Account, str], None]) -> None:
    other = make_account()
    owner_sql(other, "CREATE TABLE theirs (s text); INSERT INTO theirs VALUES ('theirs')")
    for token in (loader.token, account.master_token):
        answer = http.get(copy_url(account.base_url, account, "to"), params={
            "api_key": token, "q": f'COPY (SELECT * FROM "{other.user.database}".public.theirs)'
                                   " TO STDOUT"})
        assert_error_shape(answer, 400)
        answer = http.get(copy_url(account.base_url, account, "to"), params={
            "api_key": token, "q": f'COPY (SELECT set_config(\'role\', '
                                   f"'{other.user.owner_role}', false)) TO STDOUT"})
        assert_error_shape(answer, 400, 403)
    # their master is an unknown key here, and ours there
    answer = http.post(copy_url(account.base_url, account, "from"), content=b"x,1\n",
                       params={"api_key": other.master_token, "q": CSV_IN})
    assert (answer.status_code, answer.json()) == (401, {"error": ["Unauthorized"]})
    answer = http.get(copy_url(account.base_url, other, "to"),
                      params={"api_key": account.master_token, "q": "COPY theirs TO STDOUT"})
    assert (answer.status_code, answer.json()) == (401, {"error": ["Unauthorized"]})


@pytest.mark.parametrize(("headers", "params", "status", "error"), [
    ({"Authorization": "Bearer gkrAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}, {}, 401,
     "Unauthorized"),
    ({}, {"api_key": "default_public "}, 401, "Unauthorized"),
    ({}, {"map_key": "nope"}, 401, "Unauthorized"),
    ({"Authorization": "Basic " + base64.b64encode(b"someone-else:x").decode()}, {}, 403,
     "permission denied"),
])
def test_a_key_that_is_not_valid_here_is_refused_before_anything_runs(
        account: Account, loader: KeyHandle, http: httpx.Client, admin_url: str,
        headers: dict[str, str], params: dict[str, str], status: int, error: str) -> None:
    upload = http.post(copy_url(account.base_url, account, "from"), headers=headers,
                       params={**params, "q": CSV_IN}, content=b"Cusco,4\n")
    assert (upload.status_code, upload.json()) == (status, {"error": [error]})
    download = http.get(copy_url(account.base_url, account, "to"), headers=headers,
                        params={**params, "q": "COPY cities TO STDOUT"})
    assert (download.status_code, download.json()) == (status, {"error": [error]})
    assert count(account.base_url, account) == 2


# --- escaping the role; leaving the session dirty ---------------------------------------


@pytest.mark.parametrize("q", [
    "COPY (SELECT set_config('role', '{owner}', false)) TO STDOUT",
    "COPY (SELECT set_config('session_authorization', '{owner}', false)) TO STDOUT",
    "COPY (SELECT set_config('role', 'none', false), * FROM secrets) TO STDOUT",
    "COPY (SELECT pg_catalog.set_config('role', '{owner}', true), * FROM secrets) TO STDOUT",
])
def test_the_role_cannot_be_escaped_inside_a_copy(
        account: Account, loader: KeyHandle, http: httpx.Client, q: str) -> None:
    answer = http.get(copy_url(account.base_url, account, "to"), params={
        "api_key": loader.token, "q": q.format(owner=account.user.owner_role)})
    assert_error_shape(answer, 400, 403)
    assert b"hush" not in answer.content
    secrets = http.get(copy_url(account.base_url, account, "to"),
                       params={"api_key": loader.token, "q": "COPY secrets TO STDOUT"})
    assert_error_shape(secrets, 403)
    serves_cleanly(account.base_url, account, loader)


def test_what_a_copy_sets_in_its_session_does_not_outlive_it(
        account: Account, loader: KeyHandle, http: httpx.Client, admin_url: str) -> None:
    """A COPY TO that sets a statement timeout, a search path and a custom setting for the
    session, and takes a session advisory lock: the key's next requests, on any pooled
    session, see none of it."""
    q = ("COPY (SELECT "
         "set_config('statement_timeout', '123s', false), "
         "set_config('search_path', 'pg_temp, public', false), "
         "set_config('gk.mark', 'dirty', false), pg_advisory_lock(4242)) TO STDOUT")
    for _ in range(4):
        answer = http.get(copy_url(account.base_url, account, "to"),
                          params={"api_key": loader.token, "q": q})
        assert answer.status_code == 200, answer.text
    serves_cleanly(account.base_url, account, loader)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND objid = 4242").fetchone() == (0,)


def test_a_copyfrom_aborted_mid_way_leaves_nothing(
        harsh: ServerProcess, account: Account, loader: KeyHandle, admin_url: str) -> None:
    """Bad data after good rows, then a gzip stream cut off by a disconnect: nothing
    written, no busy session, clean sessions after."""
    bad = httpx.post(copy_url(harsh.url, account, "from"), params={
        "api_key": loader.token, "q": CSV_IN}, content=b"Cusco,4\n" * 5000 + b"Oops,many\n",
        timeout=30)
    assert_error_shape(bad, 400)
    sock = open_upload(harsh.url, account, loader.token, headers="Content-Encoding: gzip\r\n")
    send_chunk(sock, gzip.compress(b"Cusco,4\n" * 100_000)[:4000])
    wait_busy(admin_url, loader.role)
    time.sleep(0.3)
    sock.close()
    wait_quiet(admin_url, loader.role, 3)
    assert count(harsh.url, account) == 2
    serves_cleanly(harsh.url, account, loader)


def test_a_copyto_abandoned_mid_stream_frees_its_session(
        account: Account, loader: KeyHandle, admin_url: str) -> None:
    """The client reads the first blocks, then disconnects: the COPY stops at once."""
    with httpx.Client(timeout=30) as client, client.stream(
            "GET", copy_url(account.base_url, account, "to"),
            params={"api_key": loader.token, "q": ENDLESS}) as answer:
        assert answer.status_code == 200
        received = 0
        for block in answer.iter_raw():
            received += len(block)
            if received > 1_000_000:
                break
    assert wait_quiet(admin_url, loader.role, 5) < 5
    serves_cleanly(account.base_url, account, loader)


def test_a_copyto_client_that_reads_nothing_is_dropped_after_the_send_timeout(
        harsh: ServerProcess, account: Account, loader: KeyHandle, admin_url: str) -> None:
    started = time.monotonic()
    with connect(harsh.url) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        query = urlencode({"api_key": loader.token, "q": ENDLESS})
        sock.sendall(f"GET /user/{account.username}/api/v2/sql/copyto?{query} HTTP/1.1\r\n"
                     "Host: x\r\n\r\n".encode())
        wait_busy(admin_url, loader.role)
        wait_quiet(admin_url, loader.role, 7)
        freed_after = time.monotonic() - started
    assert freed_after < 5  # the send timeout (2 s), well before the COPY's limit (8 s)
    serves_cleanly(harsh.url, account, loader)


def test_a_copyto_stopped_by_the_time_limit_mid_stream_is_cut_short_and_cleaned(
        harsh: ServerProcess, account: Account, loader: KeyHandle, admin_url: str) -> None:
    q = ("COPY (SELECT g, repeat('x', 20000), pg_sleep(0.05) FROM generate_series(1, 1000) g) "
         "TO STDOUT")
    received = 0
    started = time.monotonic()
    with httpx.Client(timeout=30) as client, client.stream(
            "GET", copy_url(harsh.url, account, "to"),
            params={"api_key": loader.token, "q": q}) as answer:
        assert answer.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            for block in answer.iter_bytes():
                received += len(block)
    assert 7 < time.monotonic() - started < 14
    assert received > 0
    wait_quiet(admin_url, loader.role, 4)
    serves_cleanly(harsh.url, account, loader)


def test_a_copyfrom_stopped_by_the_time_limit_leaves_no_busy_session(
        harsh: ServerProcess, account: Account, loader: KeyHandle, admin_url: str) -> None:
    with open_upload(harsh.url, account, loader.token) as sock:
        answer = b""
        for i in range(30):
            send_chunk(sock, b"city%d,%d\n" % (i, i))
            if select.select([sock], [], [], 0.5)[0]:
                answer = answer_of(sock)
                break
    assert status_of(answer) == 429, answer
    wait_quiet(admin_url, loader.role, 4)
    assert count(harsh.url, account) == 2
    serves_cleanly(harsh.url, account, loader)


def test_a_copyto_client_gone_before_the_first_byte_frees_the_session(
        harsh: ServerProcess, account: Account, loader: KeyHandle, admin_url: str) -> None:
    """The key asks for a COPY whose first row takes long (any slow SELECT), and hangs up
    at once: the COPY must stop, not run to the COPY time limit (8 s here)."""
    with connect(harsh.url) as sock:
        query = urlencode({"api_key": loader.token,
                           "q": "COPY (SELECT pg_sleep(60)) TO STDOUT"})
        sock.sendall(f"GET /user/{account.username}/api/v2/sql/copyto?{query} HTTP/1.1\r\n"
                     "Host: x\r\n\r\n".encode())
        wait_busy(admin_url, loader.role)
    freed_after = wait_quiet(admin_url, loader.role, 10)
    assert freed_after < 3, f"the COPY ran on {freed_after:.1f} s for nobody"



def test_a_head_of_copyto_does_not_run_the_copy_for_nobody(
        harsh: ServerProcess, account: Account, loader: KeyHandle, admin_url: str) -> None:
    """HEAD reads no body: the COPY must not stream on (to the COPY time limit, 8 s here)
    while the client keeps its connection open."""
    with connect(harsh.url) as sock:
        query = urlencode({"api_key": loader.token, "q": ENDLESS})
        sock.sendall(f"HEAD /user/{account.username}/api/v2/sql/copyto?{query} HTTP/1.1\r\n"
                     "Host: x\r\n\r\n".encode())
        sock.settimeout(10)
        head = sock.recv(65536)
        assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 405")), head
        time.sleep(0.5)
        waited = wait_quiet(admin_url, loader.role, 10)
    assert waited < 3, f"the COPY streamed on {waited:.1f} s for a HEAD"
