"""The grantkey app in the test process, over the real PostgreSQL (issue 12 item 6).

Most API tests need no `grantkey serve` subprocess: they send their requests through
`httpx.ASGITransport` to the same app a worker runs (`create_app`, its lifespan and its
background tasks: the revocation listener, the pool reaper, the retries), on an event loop
of its own in a thread, as another process's would be. The subprocess server with two
workers stays for what only it has: several processes, real sockets and the HTTP protocol's
own limits (tests/conftest.py `server`).

The in-process app answers at IN_PROCESS_URL only: a client mounts `transport()` for that
origin, and any other URL still goes over the network, so a test that names the subprocess
server's URL reaches the subprocess server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable
from typing import Any, TypeVar

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from grantkey.http.app import create_app
from grantkey.settings import Settings

IN_PROCESS_URL = "http://in-process.invalid"  # .invalid: never resolved, never a real host
CALL_TIMEOUT = 120.0
log = logging.getLogger("tests.in_process")
T = TypeVar("T")


class InProcessApp:
    """`create_app(settings)` with its lifespan running on a loop in a thread of its own."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="in-process-app",
                                        daemon=True)
        self._stopping: asyncio.Event | None = None
        self._lifespan: concurrent.futures.Future[None] | None = None

    def start(self) -> None:
        self._thread.start()
        started = threading.Event()

        async def live() -> None:
            self._stopping = asyncio.Event()
            async with self.app.router.lifespan_context(self.app):
                started.set()
                await self._stopping.wait()

        self._lifespan = asyncio.run_coroutine_threadsafe(live(), self.loop)
        if not started.wait(60):
            raise RuntimeError(f"the in-process app did not start: {self._lifespan}")

    def call(self, coroutine: Awaitable[T], timeout: float = CALL_TIMEOUT) -> T:
        """Run a coroutine on the app's loop and wait for its result."""

        async def wrapped() -> T:
            return await coroutine

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    def stop(self) -> None:
        if self._stopping is not None and self._lifespan is not None:
            self.loop.call_soon_threadsafe(self._stopping.set)
            self._lifespan.result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(60)
        self.loop.close()

    def transport(self) -> InProcessTransport:
        return InProcessTransport(self)


class CutShort(Exception):
    """The app failed after its answer began: a server drops the connection."""


def as_a_server_sees_it(app: ASGIApp) -> ASGIApp:
    """An exception after a whole answer (Starlette re-raises a rendered 500 for the
    server's log) is logged and dropped, as uvicorn does; one after the answer began but
    before it ended is CutShort."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        began = ended = False

        async def tracked(message: Message) -> None:
            nonlocal began, ended
            began = True
            if message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True
            await send(message)

        try:
            await app(scope, receive, tracked)
        except Exception as error:
            if ended:
                log.info("after a whole answer: %r", error)
                return
            if began:
                raise CutShort from error
            raise

    return wrapped


class InProcessTransport(httpx.BaseTransport):
    """A synchronous httpx transport that hands each request to the app's loop through
    httpx.ASGITransport. The answer is read whole (as ASGITransport does anyway), so what
    depends on the stream itself (chunks, a connection dropped mid-answer) is for the
    subprocess server; an answer cut short still raises the RemoteProtocolError a client
    of a server would see."""

    def __init__(self, app: InProcessApp) -> None:
        self._app = app
        self._asgi = httpx.ASGITransport(app=as_a_server_sees_it(app.app),
                                         client=("127.0.0.1", 40000))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert request.url.host == httpx.URL(IN_PROCESS_URL).host, request.url
        content = request.read()

        async def exchange() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            forwarded = httpx.Request(request.method, request.url, headers=request.headers,
                                      content=content)
            response = await self._asgi.handle_async_request(forwarded)
            body = await response.aread()
            return response.status_code, response.headers.raw, body

        try:
            status, headers, body = self._app.call(exchange())
        except CutShort as error:
            raise httpx.RemoteProtocolError("the answer was cut short", request=request) from error
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body),
                              request=request)


def client(app: InProcessApp, **kwargs: Any) -> httpx.Client:
    """An httpx client that reaches the in-process app at IN_PROCESS_URL (and any other URL
    over the network)."""
    return httpx.Client(mounts={IN_PROCESS_URL: app.transport()}, **kwargs)
