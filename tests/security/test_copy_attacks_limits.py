"""Attacks on the COPY endpoints, continued (tests/security/test_copy_attacks.py has the
first part and the helpers): memory, long URLs, revocation, other tenants, bad input and
the storage quota."""

from __future__ import annotations

import contextlib
import gzip
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import quote, urlencode

import httpx
import psycopg
import pytest

from tests.conftest import Account, KeyHandle
from tests.security.test_copy_attacks import (
    CSV_IN,
    ENDLESS,
    IDS_IN,
    answer_of,
    assert_error_shape,
    busy_sessions,
    copy_url,
    count,
    end_body,
    get_raw,
    healthy,
    json_of,
    open_upload,
    raw_request,
    rows_of,
    rss_bytes,
    send_chunk,
    sql_url,
    status_of,
    wait_busy,
    wait_quiet,
)
from tests.support import ServerProcess, table_grants

# --- memory -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """1 GiB of CSV rows in about 1 MB of gzip (16 members of 64 MiB): the first row is
    id 1, all others id 2."""
    member = gzip.compress(b"2,x\n" * (16 * 2**20), compresslevel=9)
    return gzip.compress(b"1,x\n") + member * 16


@contextlib.contextmanager
def row_held(admin_url: str, account: Account) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """The owner inserts id 1 into `ids` and keeps its transaction open: a COPY of id 1
    waits for it (PostgreSQL stops reading the COPY's data); commit to release it."""
    with psycopg.connect(admin_url, dbname=account.user.database) as conn:
        conn.execute(f'SET ROLE "{account.user.owner_role}"')
        conn.execute("INSERT INTO ids VALUES (1, 'held')")
        yield conn


def upload_in_background(sock: socket.socket, body: bytes) -> threading.Thread:
    def send() -> None:
        with contextlib.suppress(OSError):
            for start in range(0, len(body), 1 << 20):
                send_chunk(sock, body[start:start + (1 << 20)])
            end_body(sock)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("kind", ["gzip bomb", "plain"])
def test_an_upload_that_postgresql_cannot_take_yet_is_not_held_in_memory(
        harsh: ServerProcess, account: Account, loader: KeyHandle, admin_url: str,
        bomb: bytes, kind: str) -> None:
    """PostgreSQL stops reading the COPY (its first row waits for a lock): the server must
    stop reading the upload too, not gunzip or buffer it (1 GiB, or 200 MiB plain)."""
    gzipped = kind == "gzip bomb"
    body = bomb if gzipped else b"1,x\n" + b"2,x\n" * (50 * 2**20)
    before = rss_bytes(harsh)
    with row_held(admin_url, account) as holder:
        sock = open_upload(harsh.url, account, loader.token, IDS_IN,
                           "Content-Encoding: gzip\r\n" if gzipped else "")
        sender = upload_in_background(sock, body)
        wait_busy(admin_url, loader.role)
        peak = before
        for _ in range(15):  # 3 s of PostgreSQL waiting
            time.sleep(0.2)
            peak = max(peak, rss_bytes(harsh))
        holder.commit()  # id 1 now exists: the COPY fails (a duplicate key)
        answer = answer_of(sock)
        sock.close()
        sender.join(10)
    assert peak - before < 100 * 2**20, f"the server grew by {(peak - before) >> 20} MiB"
    assert status_of(answer) == 400, answer[:300]
    assert b"duplicate key value" in answer
    assert count(harsh.url, account, "ids") == 1  # the owner's row alone
    wait_quiet(admin_url, loader.role, 5)


def test_a_gzip_bomb_streams_through_without_growing_the_server(
        harsh: ServerProcess, account: Account, loader: KeyHandle) -> None:
    """128 MiB of rows from about 128 KB of gzip, into PostgreSQL as fast as it takes them."""
    row = b"Lima" + b"a" * 1017 + b",1\n"  # 1 KiB
    body = gzip.compress(row * 16 * 1024, compresslevel=9) * 8
    before = rss_bytes(harsh)
    peak = before
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes(harsh))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        answer = httpx.post(copy_url(harsh.url, account, "from"), content=body, timeout=60,
                            headers={"Content-Encoding": "gzip"},
                            params={"api_key": loader.token, "q": CSV_IN})
    finally:
        done.set()
        watcher.join()
    assert answer.status_code == 200, answer.text
    assert answer.json()["total_rows"] == 128 * 1024
    assert peak - before < 100 * 2**20, f"the server grew by {(peak - before) >> 20} MiB"


@pytest.mark.xfail(strict=True, reason=(
    "known, left for later (as for the SQL API's SELECT repeat(...)): a 200 MB row costs the "
    "worker ~2 copies at its peak and ~150 MiB stay after the answer although the session "
    "that received it is now closed (freed memory the allocator keeps)"))
def test_a_huge_row_copied_out_leaves_no_memory_behind(
        harsh: ServerProcess, account: Account) -> None:
    before = rss_bytes(harsh)
    with httpx.Client(timeout=60) as client, client.stream(
            "GET", copy_url(harsh.url, account, "to"),
            params={"q": "COPY (SELECT repeat('x', 200000000)) TO STDOUT"}) as answer:
        assert answer.status_code == 200
        received = sum(len(block) for block in answer.iter_raw())
    assert received == 200_000_001
    kept = rss_bytes(harsh) - before
    assert kept < 64 * 2**20, f"the worker keeps {kept >> 20} MiB after the answer"


def test_a_url_near_the_new_limit_is_served_and_past_it_refused(
        account: Account, loader: KeyHandle, server: ServerProcess) -> None:
    """The URL may hold 3 x GRANTKEY_MAX_QUERY_BYTES (262,144) + 8 KiB = 794,624 bytes."""
    base = f"/user/{account.username}/api/v2/sql/copyto?api_key={loader.token}&q="
    statement = "COPY (SELECT 1 AS one) TO STDOUT /* {} */"
    fits = statement.format("\u00e9" * 130_000)  # 260,000 bytes, 780,000 in the URL
    url = base + quote(fits)
    assert 780_000 < len(url) < 794_624
    answer = get_raw(server.url, url)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert answer.endswith(b"1\n\r\n0\r\n\r\n") or b"\r\n\r\n1\n" in answer
    too_long = base + quote(statement.format("\u00e9" * 133_000))
    answer = get_raw(server.url, too_long)
    assert answer.startswith(b"HTTP/1.1 414"), answer[:300]
    # within the URL limit but over the query's: a 400 naming it
    over = base + "COPY%20" + "x" * 270_000
    answer = get_raw(server.url, over)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"The sql query is too long" in answer
    healthy(server.url)


@pytest.mark.parametrize("target", [
    "/user/{u}/api/v2/sql/copyto?q=COPY%20(SELECT%201)%20TO%20STDOUT%20--" + "a" * 70_000 + "#f",
    "/user/{u}/api/v2/sql/copyto?" + "&" * 70_000 + "q=COPY%20(SELECT%201)%20TO%20STDOUT",
])
def test_long_query_strings_of_odd_shapes_are_served(
        account: Account, server: ServerProcess, target: str) -> None:
    """Past httptools' own URL parser (64 KiB): a fragment, many empty parameters."""
    answer = get_raw(server.url, target.format(u=account.username))
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert answer.endswith(b"1\n\r\n0\r\n\r\n")


@pytest.mark.parametrize("target", [
    "/user/{u}/api/v2/sql/copyto/" + "a" * 70_000,
    "/user/{u}/" + "a" * 70_000 + "/api/v2/sql/copyto?q=COPY%20x",
    "http://x/user/{u}/api/v2/sql/copyto?q=COPY%20(SELECT%201)%20TO%20STDOUT%20--" + "a" * 70_000,
])
def test_long_urls_of_other_shapes_get_a_414_naming_the_limit(
        account: Account, server: ServerProcess, target: str) -> None:
    """A path, or an absolute-form URL, over 64 KiB: no parser takes it (httptools' own
    would answer a bare 400 'Invalid HTTP request received.')."""
    answer = get_raw(server.url, target.format(u=account.username))
    healthy(server.url)
    assert answer.startswith(b"HTTP/1.1 414"), answer[:300]
    assert b"The request URL is longer than" in answer


# --- revocation ------------------------------------------------------------------------


def revoke(account: Account, key: KeyHandle, how: str) -> str | None:
    """Delete the key, or regenerate its token (the new token)."""
    url = f"{account.keys_url}/{key.name}"
    if how == "delete":
        assert httpx.delete(url, params=account.master(), timeout=30).status_code == 204
        return None
    answer = httpx.post(f"{url}/token/regenerate", params=account.master(), timeout=30)
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["token"]
    return token


@pytest.mark.parametrize("how", ["delete", "regenerate"])
def test_a_revoked_keys_upload_stops_and_writes_nothing(
        account: Account, loader: KeyHandle, admin_url: str, how: str) -> None:
    with open_upload(account.base_url, account, loader.token) as sock:
        send_chunk(sock, b"Cusco,4\n" * 1000)
        wait_busy(admin_url, loader.role)
        time.sleep(0.3)  # the rows reached PostgreSQL
        new_token = revoke(account, loader, how)
        with contextlib.suppress(OSError):  # the server may have answered and closed
            send_chunk(sock, b"Arequipa,5\n" * 1000)
            end_body(sock)
        answer = answer_of(sock)
    assert status_of(answer) == 401, answer[:300]
    assert json_of(answer) == {"error": ["Unauthorized"]}
    assert count(account.base_url, account) == 2
    wait_quiet(admin_url, loader.role, 5)
    if new_token is not None:  # the new token works
        assert rows_of(account.base_url, account, "SELECT count(*) AS n FROM cities",
                       new_token) == [{"n": 2}]


def test_a_revoked_keys_trickled_uploads_do_not_keep_the_users_connections(
        harsh: ServerProcess, account: Account, loader: KeyHandle, admin_url: str) -> None:
    """Three uploads hold the key's share (3 of 6; the user may hold 4). After the key is
    deleted, its client trickles on (10 bytes every 0.3 s); the master's two concurrent
    queries must both be served."""
    uploads = [open_upload(harsh.url, account, loader.token) for _ in range(3)]
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.3):
            for sock in uploads:
                with contextlib.suppress(OSError):
                    send_chunk(sock, b"Trickle,1\n")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        deadline = time.monotonic() + 5
        while len(busy_sessions(admin_url, loader.role)) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        revoke(account, loader, "delete")
        wait_quiet(admin_url, loader.role, 1)  # PostgreSQL ended the sessions at once
        statuses: list[int] = []

        def sleep_as_master() -> None:
            answer = httpx.get(sql_url(harsh.url, account), timeout=30, params={
                "q": "SELECT pg_sleep(1.5)", "api_key": account.master_token})
            statuses.append(answer.status_code)

        queries = [threading.Thread(target=sleep_as_master) for _ in range(2)]
        for query in queries:
            query.start()
        for query in queries:
            query.join()
    finally:
        stop.set()
        trickler.join()
        for sock in uploads:
            sock.close()
    assert count(harsh.url, account) == 2
    assert statuses == [200, 200], statuses


@pytest.mark.parametrize("how", ["delete", "regenerate"])
def test_a_revoked_keys_copyto_is_cut_short(
        account: Account, loader: KeyHandle, admin_url: str, how: str) -> None:
    """The client reads on after the revocation: what was already in flight, then a cut."""
    after = 0
    with httpx.Client(timeout=30) as client, client.stream(
            "GET", copy_url(account.base_url, account, "to"),
            params={"api_key": loader.token, "q": ENDLESS}) as answer:
        assert answer.status_code == 200
        blocks = answer.iter_raw()
        assert next(blocks)
        revoke(account, loader, how)
        revoked_at = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):
            for block in blocks:
                after += len(block)
                assert after < 64 * 2**20, "the stream goes on after the revocation"
    assert time.monotonic() - revoked_at < 5
    wait_quiet(admin_url, loader.role, 5)


# --- other tenants ---------------------------------------------------------------------


def test_one_keys_stalled_uploads_do_not_starve_other_tenants(
        harsh: ServerProcess, account: Account, loader: KeyHandle,
        make_account: Callable[[], Account], owner_sql: Callable[[Account, str], None],
        make_key: Callable[..., KeyHandle], admin_url: str) -> None:
    """Six uploads of one key that trickle (each within the body timeout) hold at most the
    key's share (3 of the worker's 6 connections); the rest wait and are refused with 429.
    Another tenant's key, and this user's master, are served at once meanwhile, and the
    key is revoked at once."""
    other = make_account()
    owner_sql(other, "CREATE TABLE t (v int)")
    their_key = make_key(other, "theirs", table_grants([("public", "t", ["select"])]))
    uploads = [open_upload(harsh.url, account, loader.token) for _ in range(6)]
    try:
        answers: dict[int, bytes] = {}

        def trickle(row: bytes) -> None:
            for i, sock in enumerate(uploads):
                if i not in answers:
                    with contextlib.suppress(OSError):
                        send_chunk(sock, row)
                    if select.select([sock], [], [], 0)[0]:
                        answers[i] = answer_of(sock, 5)

        for round_ in range(6):  # 2 s of trickling: each upload sends a row every 0.4 s
            time.sleep(0.3)
            trickle(b"Trickle,%d\n" % round_)
            started = time.monotonic()
            assert rows_of(harsh.url, other, "SELECT count(*) AS n FROM t",
                           their_key.token) == [{"n": 0}]
            assert rows_of(harsh.url, account, "SELECT 1 AS one",
                           account.master_token) == [{"one": 1}]
            assert time.monotonic() - started < 0.9  # no wait for a connection
        assert len(answers) == 3, answers  # the three over the key's share
        for answer in answers.values():
            assert status_of(answer) == 429, answer[:300]
            assert b"Too many concurrent queries" in answer
        assert len(busy_sessions(admin_url, loader.role)) == 3
        started = time.monotonic()
        revoke(account, loader, "delete")
        assert time.monotonic() - started < 1
        wait_quiet(admin_url, loader.role, 0.5)  # its sessions were ended with it
        holders = [sock for i, sock in enumerate(uploads) if i not in answers]
        for sock in holders:
            end_body(sock)
            assert status_of(answer_of(sock, 10)) == 401
    finally:
        for sock in uploads:
            sock.close()
    assert count(harsh.url, account) == 2
    wait_quiet(admin_url, loader.role, 5)


# --- bad input -------------------------------------------------------------------------


def upload_head(account: Account, token: str, extra: str) -> bytes:
    query = urlencode({"api_key": token, "q": CSV_IN})
    return (f"POST /user/{account.username}/api/v2/sql/copyfrom?{query} HTTP/1.1\r\n"
            f"Host: x\r\nConnection: close\r\n{extra}\r\n").encode("latin-1")


@pytest.mark.parametrize(("extra", "body"), [
    ("Content-Length: abc\r\n", b"Cusco,4\n"),
    ("Content-Length: -1\r\n", b"Cusco,4\n"),
    ("Content-Length: 1e3\r\n", b"Cusco,4\n"),
    ("Content-Length: \u00b2\r\n", b"Cusco,4\n"),  # a superscript two: isdigit(), not int()
    ("Content-Length: 99999999999999999999999\r\n", b"Cusco,4\n"),
    ("Content-Length: 8\r\nContent-Length: 9\r\n", b"Cusco,4\n"),
    ("Content-Length: 8\r\nTransfer-Encoding: chunked\r\n", b"8\r\nCusco,4\n\r\n0\r\n\r\n"),
    ("Content-Length: 100\r\n", b"Cusco,4\n"),  # a body shorter than declared
])
def test_bad_framing_is_a_client_error(
        harsh: ServerProcess, account: Account, loader: KeyHandle, extra: str,
        body: bytes) -> None:
    answer = raw_request(harsh.url, upload_head(account, loader.token, extra), body)
    assert answer.startswith(b"HTTP/1.1 4"), answer[:300]
    assert b"Traceback" not in answer
    assert count(harsh.url, account) == 2
    healthy(harsh.url)


@pytest.mark.parametrize(("encoding", "body", "status", "message"), [
    ("gzip, gzip", gzip.compress(gzip.compress(b"Cusco,4\n")), 400,
     "Unsupported Content-Encoding: gzip, gzip (send gzip or none)"),
    ("deflate", b"x\x9cs.-N\xce\xd71\xe1\x02\x00\x0b\x1c\x02\x1c", 400,
     "Unsupported Content-Encoding: deflate (send gzip or none)"),
    ("GZIP", gzip.compress(b"Cusco,4\n"), 200, None),
    ("X-Gzip", gzip.compress(b"Cusco,4\n"), 200, None),
    ("identity", b"Cusco,4\n", 200, None),
    ("gzip", b"", 400, "Error while gunzipping: unexpected end of file"),
    ("gzip", b"\x1f\x8b", 400, "Error while gunzipping: unexpected end of file"),
    ("gzip", gzip.compress(b"Cusco,4\n") + b"\x1f", 400,
     "Error while gunzipping: unexpected end of file"),
    ("gzip", gzip.compress(b"Cusco,4\n") + b"\x00" * 512, 400,
     "Error while gunzipping: data after the end of the gzip stream"),
    ("gzip", b"\x1f\x8b\x08\x00" + b"\xff" * 100, 400, None),
])
def test_content_encoding_tricks_are_a_clear_400_or_work(
        account: Account, loader: KeyHandle, http: httpx.Client, encoding: str, body: bytes,
        status: int, message: str | None) -> None:
    answer = http.post(copy_url(account.base_url, account, "from"), content=body,
                       headers={"Content-Encoding": encoding},
                       params={"api_key": loader.token, "q": CSV_IN})
    if status == 200:
        assert answer.status_code == 200, answer.text
        assert answer.json()["total_rows"] == 1
        return
    found = assert_error_shape(answer, status)
    if message is not None:
        assert found == message
    else:
        assert found.startswith("Error while gunzipping: ")
    assert count(account.base_url, account) == 2


@pytest.mark.parametrize("body", [
    {"q": ["COPY cities TO STDOUT", "COPY secrets TO STDOUT"]},
    {"q": {"q": "COPY cities TO STDOUT"}},
    {"q": 1},
    {"q": None},
    {"q": True},
    ["COPY cities TO STDOUT"],
    "COPY cities TO STDOUT",
])
def test_copyto_with_q_that_is_not_a_string_is_400_sql_is_missing(
        account: Account, loader: KeyHandle, http: httpx.Client, body: object) -> None:
    answer = http.post(copy_url(account.base_url, account, "to"),
                       params={"api_key": loader.token}, json=body)
    assert (answer.status_code, answer.json()) == (400, {"error": ["SQL is missing"]})


@pytest.mark.parametrize("raw", [
    b"COPY%20cities%20TO%20STDOUT%00",
    b"COPY%20cities%20TO%20STDOUT%20--%FF%FE",
    b"COPY%20(SELECT%20%27%ED%A0%80%27)%20TO%20STDOUT",  # an encoded surrogate
    b"COPY%20(SELECT%20%27\xc3\xa9%27)%20TO%20STDOUT",  # raw bytes, not percent-encoded
    b"COPY%20(SELECT%20%27\xff%27)%20TO%20STDOUT",
    b"COPY%20",
    b"COPY%20cities%20TO%20STDOUT%20WITH%20(FORMAT%20nonsense)",
    b"copy%20cities%20TO%20STDOUT%20WITH%20(ENCODING%20%27nope%27)",
])
def test_odd_bytes_in_q_are_answered_without_a_500(
        account: Account, loader: KeyHandle, server: ServerProcess, raw: bytes) -> None:
    for direction in ("to", "from"):
        head = (b"%s /user/%s/api/v2/sql/copy%s?api_key=%s&q=%s HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                % (b"GET" if direction == "to" else b"POST", account.username.encode(),
                   direction.encode(), loader.token.encode(), raw))
        answer = raw_request(server.url, head)
        assert answer.startswith((b"HTTP/1.1 200", b"HTTP/1.1 400", b"HTTP/1.1 403")), answer[:300]
        assert b"Traceback" not in answer
        if b"application/json" in answer.split(b"\r\n\r\n")[0]:
            assert isinstance(json_of(answer), dict)
        else:  # httptools refuses bytes that are not ASCII in the request line
            assert answer.startswith(b"HTTP/1.1 400") or answer.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("body", [
    b'{"q": "COPY cities TO STDOUT\\u0000"}',
    b'{"q": "COPY (SELECT \'\\ud800\') TO STDOUT"}',
    b'{"q": "COPY (SELECT \'\xff\') TO STDOUT"}',
    b'{"q": "COPY cities TO STDOUT"',
])
def test_odd_json_bodies_for_copyto_are_a_400(
        account: Account, loader: KeyHandle, http: httpx.Client, body: bytes) -> None:
    answer = http.post(copy_url(account.base_url, account, "to"), content=body,
                       params={"api_key": loader.token},
                       headers={"Content-Type": "application/json"})
    assert_error_shape(answer, 400)


def test_a_hostile_filename_cannot_inject_headers(
        account: Account, loader: KeyHandle, http: httpx.Client) -> None:
    answer = http.post(copy_url(account.base_url, account, "to"), params={
        "api_key": loader.token}, data={
        "q": "COPY (SELECT 1) TO STDOUT", "filename": "x\r\nSet-Cookie: a=b\r\n\r\n<script>;\""})
    assert answer.status_code == 200, answer.text
    assert "set-cookie" not in answer.headers
    disposition = answer.headers["content-disposition"]
    assert disposition.startswith("attachment; filename=x%0D%0ASet-Cookie")
    name = disposition.removeprefix("attachment; filename=")
    assert all(c not in name for c in "\r\n\";<> ")


def test_copyfrom_ignores_credentials_and_q_in_its_body(
        account: Account, loader: KeyHandle, http: httpx.Client) -> None:
    """The upload is data: an api_key or q in a form-looking body is not read (no key in the
    query string: the default public key, which may not insert)."""
    answer = http.post(copy_url(account.base_url, account, "from"), params={"q": CSV_IN},
                       data={"api_key": loader.token, "q": "COPY secrets TO STDOUT"})
    assert (answer.status_code, answer.json()) == (
        403, {"error": ["permission denied for table cities"]})
    assert count(account.base_url, account) == 2





# --- the storage quota -----------------------------------------------------------------


def test_a_copy_cannot_write_on_past_the_storage_quota_for_longer_than_a_query_may_run(
        harsh: ServerProcess, limited: Account, make_key: Callable[..., KeyHandle],
        admin_url: str) -> None:
    """The quota (3 MB of headroom) is crossed in the first second; the upload goes on at
    4 MB a second for 5 s more, longer than any SQL API statement may run here (3 s)."""
    key = make_key(limited, "filler", table_grants([("public", "big", ["select", "insert"])]))
    block = gzip.compress(b"".join(b"%d,%s\n" % (i, b"x" * 1000) for i in range(2048)))
    with open_upload(harsh.url, limited, key.token, "COPY big FROM STDIN WITH (FORMAT csv)",
                     "Content-Encoding: gzip\r\n") as sock:
        answer = b""
        for _ in range(12):  # 2 MB of rows every 0.5 s
            with contextlib.suppress(OSError):
                send_chunk(sock, block)
            if select.select([sock], [], [], 0.5)[0]:
                answer = answer_of(sock)
                break
        else:
            end_body(sock)
            answer = answer_of(sock)
    rows = rows_of(harsh.url, limited, "SELECT count(*) AS n FROM big", limited.master_token)
    written = int(str(rows[0]["n"])) * 1024
    assert written < 10 * 2**20, f"{written >> 20} MB written past 3 MB of headroom: {answer[:200]!r}"
    wait_quiet(admin_url, key.role, 5)
