"""COPY's limits, on a server of its own with small ones: the upload size, an upload that
stalls, the COPY time limit, and a client that goes away mid-upload. After each, nothing
is written and the key's next request is served."""

from __future__ import annotations

import gzip
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import httpx
import pytest

from tests.conftest import Account, KeyHandle, Login
from tests.support import ServerProcess, table_grants

CSV_IN = "COPY cities (name, population) FROM STDIN WITH (FORMAT csv)"


@pytest.fixture(scope="module")
def tight(data_dir: Path, login: Login) -> Iterator[ServerProcess]:
    """Uploads of at most 64 KiB that may pause 2 s; a COPY may run 4 s."""
    server = ServerProcess(login.args(data_dir), data_dir / "copy-limits.log",
                           {**login.env, "GRANTKEY_COPY_MAX_BYTES": "65536",
                            "GRANTKEY_BODY_TIMEOUT": "2", "GRANTKEY_COPY_TIMEOUT": "4"})
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.fixture
def loader(account: Account, owner_sql: Callable[[Account, str], None],
           make_key: Callable[..., KeyHandle]) -> KeyHandle:
    owner_sql(account, "CREATE TABLE cities (name text, population int)")
    return make_key(account, "loader", table_grants([("public", "cities", ["select", "insert"])]))


def url(server: ServerProcess, account: Account, direction: str) -> str:
    return f"{server.url}/user/{account.username}/api/v2/sql/copy{direction}"


def count(server: ServerProcess, account: Account) -> int:
    answer = httpx.get(f"{server.url}/user/{account.username}/api/v2/sql", params={
        "q": "SELECT count(*) AS n FROM cities", "api_key": account.master_token})
    return int(answer.json()["rows"][0]["n"])


def still_serves(server: ServerProcess, account: Account, key: KeyHandle) -> None:
    for _ in range(4):  # each of the key's pooled sessions is fit for reuse
        answer = httpx.get(f"{server.url}/user/{account.username}/api/v2/sql", params={
            "q": "SELECT 1 AS one", "api_key": key.token})
        assert answer.json()["rows"] == [{"one": 1}]


def rows(n: int) -> bytes:
    return b"".join(b"city%d,%d\n" % (i, i) for i in range(n))


def test_copyfrom_past_the_size_limit_is_400_naming_it_and_writes_nothing(
        tight: ServerProcess, account: Account, loader: KeyHandle) -> None:
    params = {"api_key": loader.token, "q": CSV_IN}
    declared = httpx.post(url(tight, account, "from"), params=params, content=rows(10_000))
    assert declared.status_code == 400
    assert declared.json() == {"error": ["COPY FROM maximum POST size of 64 KB exceeded"]}

    def streamed() -> Iterator[bytes]:
        data = rows(10_000)
        for start in range(0, len(data), 4096):
            yield data[start:start + 4096]

    chunked = httpx.post(url(tight, account, "from"), params=params, content=streamed())
    assert chunked.status_code == 400
    assert chunked.json() == {"error": ["COPY FROM maximum POST size of 64 KB exceeded"]}
    assert count(tight, account) == 0
    still_serves(tight, account, loader)


def test_copyfrom_size_limit_counts_the_gzip_bytes_received(
        tight: ServerProcess, account: Account, loader: KeyHandle) -> None:
    data = rows(10_000)  # about 150 KB, far less gzipped
    answer = httpx.post(url(tight, account, "from"), content=gzip.compress(data),
                        headers={"Content-Encoding": "gzip"},
                        params={"api_key": loader.token, "q": CSV_IN})
    assert answer.status_code == 200, answer.text
    assert answer.json()["total_rows"] == 10_000


def open_upload(server: ServerProcess, account: Account, key: KeyHandle) -> socket.socket:
    """A chunked copyfrom whose body is sent by hand."""
    address = urlsplit(server.url)
    sock = socket.create_connection((address.hostname, address.port), timeout=30)
    query = urlencode({"api_key": key.token, "q": CSV_IN})
    sock.sendall(f"POST /user/{account.username}/api/v2/sql/copyfrom?{query} HTTP/1.1\r\n"
                 f"Host: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    return sock


def send_chunk(sock: socket.socket, data: bytes) -> None:
    sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))


def answer_of(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
        if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
            break
    return answer


def test_copyfrom_a_client_that_goes_away_mid_upload_writes_nothing(
        tight: ServerProcess, account: Account, loader: KeyHandle) -> None:
    sock = open_upload(tight, account, loader)
    send_chunk(sock, rows(100))
    time.sleep(0.5)  # the rows reached PostgreSQL's COPY
    sock.close()
    time.sleep(1)
    assert count(tight, account) == 0
    still_serves(tight, account, loader)


def test_copyfrom_an_upload_that_stalls_is_400_after_the_body_timeout(
        tight: ServerProcess, account: Account, loader: KeyHandle) -> None:
    with open_upload(tight, account, loader) as sock:
        send_chunk(sock, rows(10))
        started = time.monotonic()
        answer = answer_of(sock)
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b"The upload stopped: no data for 2 seconds" in answer
    assert 1.5 < waited < 10
    assert count(tight, account) == 0
    still_serves(tight, account, loader)


def test_copyfrom_a_slow_upload_is_stopped_at_the_copy_time_limit_with_429(
        tight: ServerProcess, account: Account, loader: KeyHandle) -> None:
    """Bytes keep coming (each pause under the body timeout), but the COPY may run 4 s."""
    answer = b""
    with open_upload(tight, account, loader) as sock:
        started = time.monotonic()
        for i in range(12):
            send_chunk(sock, b"city%d,%d\n" % (i, i))
            if select.select([sock], [], [], 1)[0]:  # the answer came
                answer = answer_of(sock)
                break
        answered_after = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 429"), answer
    assert b"SQL query timeout error" in answer
    assert 3.5 < answered_after < 10
    assert count(tight, account) == 0
    still_serves(tight, account, loader)


def test_copyfrom_answered_early_drops_a_client_still_sending_after_the_body_timeout(
        tight: ServerProcess, account: Account, loader: KeyHandle,
        make_key: Callable[..., KeyHandle]) -> None:
    """An upload refused at once (no INSERT) whose client goes on sending: the rest is read
    and dropped for the body timeout (2 s), then the connection is dropped."""
    reader = make_key(account, "reader", table_grants([("public", "cities", ["select"])]))
    with open_upload(tight, account, reader) as sock:
        send_chunk(sock, rows(10))
        assert select.select([sock], [], [], 10)[0]
        answer = sock.recv(65536)
        started = time.monotonic()
        with pytest.raises(OSError):  # sends until the server drops us
            for _ in range(100):
                send_chunk(sock, rows(10))
                time.sleep(0.1)
                if not select.select([sock], [], [], 0)[0]:
                    continue
                if not sock.recv(65536):
                    raise ConnectionResetError("closed")
        dropped_after = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 403"), answer
    assert b"permission denied for table cities" in answer
    assert 1.5 < dropped_after < 8


def test_copyto_that_runs_past_the_copy_time_limit_is_429_before_its_first_byte(
        tight: ServerProcess, account: Account, loader: KeyHandle) -> None:
    started = time.monotonic()
    answer = httpx.get(url(tight, account, "to"), timeout=30, params={
        "api_key": loader.token, "q": "COPY (SELECT pg_sleep(30)) TO STDOUT"})
    assert answer.status_code == 429
    assert "SQL query timeout error" in answer.json()["error"][0]
    assert time.monotonic() - started < 12
    still_serves(tight, account, loader)


def test_copyfrom_a_long_upload_is_not_cut_by_the_body_timeout(
        tight: ServerProcess, account: Account, loader: KeyHandle) -> None:
    """The body timeout bounds pauses, not the upload: 3 s of steady bytes pass (a
    plain request's body must arrive whole within it)."""
    with open_upload(tight, account, loader) as sock:
        for i in range(6):
            send_chunk(sock, b"city%d,%d\n" % (i, i))
            time.sleep(0.5)
        sock.sendall(b"0\r\n\r\n")
        answer = answer_of(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b'"total_rows":6' in answer
    assert count(tight, account) == 6
