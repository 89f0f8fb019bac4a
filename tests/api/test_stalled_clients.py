"""A client that stops reading a large answer holds nothing for long: its database
connection is freed when the time limit fires, whatever the client does, and its HTTP
connection is dropped once it has read nothing for GRANTKEY_SEND_TIMEOUT seconds."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest

from tests.conftest import Account, Login
from tests.support import ServerProcess

# each test starts its own server or cluster: out of the inner loop
pytestmark = pytest.mark.slow

BIG = "SELECT g, repeat('x', 5000) AS pad FROM generate_series(1, 1000000) AS g"
TIME_LIMIT, SEND_TIMEOUT = 2, 5


@pytest.fixture(scope="module")
def one_slot(data_dir: Path, login: Login) -> Iterator[ServerProcess]:
    """One database connection per worker, 2 s time limit, 5 s send deadline."""
    server = ServerProcess(
        login.args(data_dir), data_dir / "stalled.log",
        {**login.env, "GRANTKEY_SQL_MAX_CONNECTIONS": "1",
         "GRANTKEY_SQL_POOL_WAIT": "1", "GRANTKEY_SQL_TIMEOUT": str(TIME_LIMIT),
         "GRANTKEY_SQL_MASTER_TIMEOUT": str(TIME_LIMIT),
         "GRANTKEY_SEND_TIMEOUT": str(SEND_TIMEOUT)})
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def stalled_request(server: ServerProcess, account: Account) -> socket.socket:
    """A GET of a huge answer whose client then reads nothing (a tiny receive buffer)."""
    address = urlsplit(server.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((address.hostname, address.port))
    path = f"/user/{account.username}/api/v2/sql?q={quote(BIG)}"
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def drain(sock: socket.socket, seconds: float = 20) -> bytes:
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(1 << 20):
            received += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return received


def test_a_client_that_stops_reading_frees_its_database_connection_at_the_time_limit(
    one_slot: ServerProcess, account: Account,
) -> None:
    sql = f"{one_slot.url}/user/{account.username}/api/v2/sql"
    with stalled_request(one_slot, account) as stalled:
        time.sleep(TIME_LIMIT + 4.5)  # the time limit, the cancel's grace, the terminate
        other = httpx.get(sql, params={"q": "SELECT 1 AS one", "api_key": account.master_token},
                          timeout=30)
        assert other.status_code == 200, other.text
        assert other.json()["rows"] == [{"one": 1}]
        drain(stalled)


def test_a_client_that_reads_nothing_is_dropped_after_the_send_timeout(
    one_slot: ServerProcess, account: Account,
) -> None:
    before = one_slot.log_path.stat().st_size
    with stalled_request(one_slot, account) as stalled:
        time.sleep(SEND_TIMEOUT + 3)
        received = drain(stalled)
    assert received.startswith(b"HTTP/1.1 200")
    assert not received.endswith(b"0\r\n\r\n"), "the answer was finished, not dropped"
    assert len(received) < 200 * 2**20
    with one_slot.log_path.open("rb") as log:
        log.seek(before)
        written = log.read().decode(errors="replace")
    assert "Traceback" not in written and "ASGI callable" not in written, written
    assert httpx.get(f"{one_slot.url}/health").status_code == 200


def test_an_answer_cut_by_the_time_limit_never_looks_complete(
    one_slot: ServerProcess, account: Account,
) -> None:
    """The first rows went out with a 200; the time limit stops the rest: the connection is
    dropped without the final chunk, so the client sees a broken answer, not a short one."""
    query = ("SELECT g, CASE WHEN g > 3000 THEN pg_sleep(10) END AS s "
             "FROM generate_series(1, 5000) AS g")
    address = urlsplit(one_slot.url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall((f"GET /user/{account.username}/api/v2/sql?format=csv&q={quote(query)}"
                      f"&api_key={account.master_token} HTTP/1.1\r\nHost: x\r\n\r\n").encode())
        received = drain(sock)
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    assert b"\r\n1999," in received  # the first batch arrived
    assert not received.endswith(b"0\r\n\r\n"), "the cut answer was closed like a whole one"
