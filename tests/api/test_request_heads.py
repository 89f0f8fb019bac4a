"""A request's head is bounded in size and in time (uvicorn with httptools bounds neither):
431 past GRANTKEY_MAX_HEADER_BYTES, 414 past 3 x GRANTKEY_MAX_QUERY_BYTES + 8 KiB of URL
(longer SQL goes in a POST body), 408 and a closed connection when the head trickles in past
GRANTKEY_HEADER_TIMEOUT. The server keeps serving everyone else."""

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


@pytest.fixture(scope="module")
def strict(data_dir: Path, login: Login) -> Iterator[ServerProcess]:
    """A server with a 1 s head deadline, a 2 s body deadline and 4 KiB of header fields."""
    server = ServerProcess(login.args(data_dir), data_dir / "heads.log",
                           {**login.env, "GRANTKEY_HEADER_TIMEOUT": "1",
                            "GRANTKEY_MAX_HEADER_BYTES": "4096", "GRANTKEY_BODY_TIMEOUT": "2"})
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def connect(server: ServerProcess) -> socket.socket:
    address = urlsplit(server.url)
    return socket.create_connection((address.hostname, address.port), timeout=10)


def read_all(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def read_response(sock: socket.socket) -> bytes:
    """One whole answer with a Content-Length: TCP may hand over its head and body apart."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)
        if not chunk:
            return answer
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_header_fields_past_the_limit_answer_431_and_the_server_goes_on(
    strict: ServerProcess,
) -> None:
    response = httpx.get(f"{strict.url}/health", headers={"X-Big": "a" * 5000})
    assert response.status_code == 431
    assert "header fields are too large" in response.text
    many = {f"X-H{i}": "b" * 100 for i in range(60)}
    assert httpx.get(f"{strict.url}/health", headers=many).status_code == 431
    assert httpx.get(f"{strict.url}/health").status_code == 200


def test_a_60_mb_header_is_never_read_in_full(strict: ServerProcess) -> None:
    with connect(strict) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:
            while sent < 60 * 2**20:
                sock.sendall(b"c" * 2**20)
                sent += 2**20
        except OSError:
            pass  # the server closed the connection
        assert sent < 60 * 2**20, "the server kept reading"


def raw_get(server: ServerProcess, target: str) -> bytes:
    """A GET sent as is (httpx refuses URLs over 64 KiB)."""
    with connect(server) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return read_all(sock)


def test_a_long_url_answers_414_saying_to_post_and_a_long_query_works_in_a_post(
    strict: ServerProcess, account: Account,
) -> None:
    path = f"/user/{account.username}/api/v2/sql?api_key={account.master_token}&q="
    fits = raw_get(strict, path + quote("SELECT '" + "é" * 10_000 + "' AS s"))  # 60 KB
    assert fits.startswith(b"HTTP/1.1 200"), fits[:300]
    too_long = raw_get(strict, path + "x" * 800_000)  # past 3 x GRANTKEY_MAX_QUERY_BYTES + 8 KiB
    assert too_long.startswith(b"HTTP/1.1 414"), too_long[:300]
    assert b"send long SQL queries in a POST body" in too_long
    posted = httpx.post(f"{strict.url}/user/{account.username}/api/v2/sql",
                        params={"api_key": account.master_token},
                        json={"q": "SELECT '" + "é" * 100_000 + "' AS s"}, timeout=30)
    assert posted.status_code == 200, posted.text[:300]


def test_a_head_that_trickles_in_is_cut_at_the_deadline_with_408(strict: ServerProcess) -> None:
    with connect(strict) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        answer = b""
        try:
            for _ in range(40):  # one header byte every 0.25 s: 10 s if never cut
                sock.sendall(b"X")
                time.sleep(0.25)
        except OSError:
            pass
        answer = read_all(sock)
        cut_after = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert cut_after < 8, cut_after
    assert httpx.get(f"{strict.url}/health").status_code == 200


def test_a_connection_that_sends_nothing_is_closed(strict: ServerProcess) -> None:
    with connect(strict) as sock:
        answer = read_all(sock)  # returns when the server closes
    assert answer.startswith(b"HTTP/1.1 408")


def test_keep_alive_requests_each_get_their_own_head_deadline(strict: ServerProcess) -> None:
    with httpx.Client() as client:
        for _ in range(3):
            assert client.get(f"{strict.url}/health").status_code == 200
            time.sleep(0.6)  # idle below the 1 s deadline and uvicorn's keep-alive


def test_a_body_that_never_arrives_is_cut_with_408(
    strict: ServerProcess, account: Account,
) -> None:
    """GRANTKEY_BODY_TIMEOUT (2 s here): a POST whose body never comes."""
    with connect(strict) as sock:
        sock.sendall(f"POST /user/{account.username}/api/v2/sql HTTP/1.1\r\nHost: x\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode())
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body did not arrive in time" in answer


def test_a_stray_line_break_on_a_kept_alive_connection_does_not_hold_it_open(
    strict: ServerProcess,
) -> None:
    with connect(strict) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = read_response(sock)
        assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"}"), first
        sock.sendall(b"\r\n")  # cancels uvicorn's keep-alive timer, starts no request
        sock.settimeout(10)
        rest = read_all(sock)  # returns once the server closes the connection
    assert rest == b"" or rest.startswith(b"HTTP/1.1 408"), rest[:200]


def test_a_pipelined_head_does_not_cut_the_answer_before_it(
    strict: ServerProcess, account: Account,
) -> None:
    path = f"/user/{account.username}/api/v2/sql?api_key={account.master_token}&q="
    with connect(strict) as sock:
        sock.sendall(f"GET {path}{quote('SELECT pg_sleep(1.5) AS s')} HTTP/1.1\r\nHost: x\r\n"
                     "\r\nGET /health HTTP/1.1\r\nHost".encode())  # the next head, half sent
        sock.settimeout(10)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
