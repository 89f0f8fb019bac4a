"""A client that disconnects in the middle of its request body is not a server fault: one
line at INFO level (not shown at the default level), never a traceback or an 'unexpected
error', and the server keeps serving."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import Account
from tests.support import ServerProcess


def send_half_a_body(base_url: str, path: str) -> None:
    address = urlsplit(base_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                      '{"q": "SELECT 1", ').encode())
        time.sleep(0.3)  # the server is now waiting for the rest of the body


@pytest.mark.parametrize("api", ["api/v2/sql", "api/v3/api_keys"])
def test_a_client_that_disconnects_during_the_body_is_not_logged_as_an_error(
    server: ServerProcess, account: Account, http: httpx.Client, api: str,
) -> None:
    before = server.log_path.stat().st_size
    for _ in range(3):
        send_half_a_body(server.url, f"/user/{account.username}/{api}")
    time.sleep(0.5)
    assert account.sql(http, "SELECT 1 AS one", account.master_token).status_code == 200
    with server.log_path.open("rb") as log:
        log.seek(before)
        written = log.read().decode(errors="replace")
    assert "Traceback" not in written and "unexpected error" not in written, written
    assert "Exception in ASGI application" not in written, written
