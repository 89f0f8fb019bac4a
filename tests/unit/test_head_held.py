"""A response's head leaves with its body's first bytes, in one send (uvicorn writes them
apart: two system calls and two TCP segments for every small answer), and holding it never
reorders, delays past the loop's turn, or loses bytes.

Real HTTP over a real socket on 127.0.0.1, served by grantkey's protocol class; a shim on
the server's transport counts the writes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from grantkey.http.protocol import BoundedHttpProtocol

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
App = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]
GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class CountingTransport:
    """The server's real transport, its writes counted."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


async def serve(app: App, writes: list[bytes]) -> asyncio.Server:
    config = uvicorn.Config(app, http=BoundedHttpProtocol, log_config=None, lifespan="off")
    config.load()
    state = ServerState()

    class Counting(BoundedHttpProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(CountingTransport(transport, writes))  # type: ignore[arg-type]

    return await asyncio.get_running_loop().create_server(
        lambda: Counting(config=config, server_state=state, app_state={}), "127.0.0.1", 0)


async def exchange(server: asyncio.Server, request: bytes, *, until_closed: bool = False,
                   then: bytes = b"") -> bytes:
    """Send `request` (and `then` once an interim 100 arrived); return what came back."""
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    seen = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break
            seen += chunk
            if then and seen.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
                writer.write(then)
                then = b""
            if not until_closed and seen.endswith(b"the end"):
                break
    finally:
        writer.close()
    return seen


def small_app(body: bytes = b"the end") -> App:
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    return app


def test_a_small_answer_leaves_in_one_write_head_and_body_together() -> None:
    async def run() -> tuple[list[bytes], bytes]:
        writes: list[bytes] = []
        async with await serve(small_app(), writes) as server:
            return writes, await exchange(server, GET)

    writes, answer = asyncio.run(run())
    assert len(writes) == 1, writes
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\nthe end")
    assert answer == writes[0]


def test_keep_alive_answers_each_leave_in_one_write_in_order() -> None:
    async def run() -> list[bytes]:
        writes: list[bytes] = []
        async with await serve(small_app(), writes) as server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(3):
                writer.write(GET)
                answer = b""
                while not answer.endswith(b"the end"):
                    answer += await asyncio.wait_for(reader.read(65536), 5)
                assert answer.count(b"HTTP/1.1 200 OK") == 1
            writer.close()
        return writes

    writes = asyncio.run(run())
    assert len(writes) == 3 and all(w.endswith(b"\r\n\r\nthe end") for w in writes)


def test_a_streamed_answer_sends_its_head_before_a_slow_body() -> None:
    """The head is held only for the loop's turn: a client sees it while the body waits."""
    async def run() -> tuple[bytes, list[bytes]]:
        writes: list[bytes] = []
        head_seen = asyncio.Event()

        async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await asyncio.wait_for(head_seen.wait(), 5)  # times out if the head is held
            await send({"type": "http.response.body", "body": b"the end"})

        async with await serve(app, writes) as server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GET)
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            head_seen.set()
            rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
            writer.close()
        return first + rest, writes

    answer, writes = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"transfer-encoding: chunked" in answer
    assert answer.endswith(b"7\r\nthe end\r\n0\r\n\r\n")
    assert len(writes) == 2  # the head alone (the body was not ready), then the body


def test_connection_close_sends_the_whole_answer_before_closing() -> None:
    async def run() -> bytes:
        async with await serve(small_app(), []) as server:
            return await exchange(server, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                  until_closed=True)

    answer = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\nthe end")


def test_an_expect_100_continue_upload_gets_its_interim_answer_then_the_answer() -> None:
    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body) + 8).encode())]})
        await send({"type": "http.response.body", "body": body + b" the end"})

    async def run() -> bytes:
        async with await serve(app, []) as server:
            return await exchange(server, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                  b"Expect: 100-continue\r\n\r\n", then=b"hello")

    answer = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\nhello the end")


@pytest.mark.parametrize("size", [1, 65536, 4 * 2**20])
def test_answers_of_any_size_arrive_whole(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256) + b"the end"

    async def run() -> bytes:
        async with await serve(small_app(body), []) as server:
            return await exchange(server, GET)

    assert asyncio.run(run()).partition(b"\r\n\r\n")[2] == body
