"""uvicorn's httptools protocol with bounds on a request's size and on the time its parts
take to arrive (uvicorn with httptools bounds neither).

- The URL may hold three times GRANTKEY_MAX_QUERY_BYTES and 8 KiB more (414; the SDK sends
  COPY statements in the URL, however long; httptools' own URL parser fails at 64 KiB, so a
  longer query string is split off here), the header fields at most
  GRANTKEY_MAX_HEADER_BYTES (431); either way the connection is then closed.
- From a connection's first byte (or the end of the previous answer) the whole head must
  arrive within GRANTKEY_HEADER_TIMEOUT seconds, else 408 and the connection is closed (a
  slow-loris client cannot hold a connection by trickling bytes).
- The body must arrive within GRANTKEY_BODY_TIMEOUT seconds of the head's end, else 408
  (or, if the answer already began, the connection is dropped). Its size is the handlers'
  business (GRANTKEY_MAX_BODY_BYTES). An upload (copyfrom) has no such deadline: its
  handler ends one whose bytes stop coming for GRANTKEY_BODY_TIMEOUT seconds.

A response's head is held until its body's first bytes (or the end of the event loop's
turn) and leaves with them in one send: uvicorn writes them apart, two system calls (and two
TCP segments) for every small answer.

Each request's scope carries an extension, "grantkey.abort", whose `abort()` drops the
connection at once: the SQL API's streamed answers use it when a client stops reading
(GRANTKEY_SEND_TIMEOUT) and when an answer is cut short (so that it never looks complete).
"""

from __future__ import annotations

import asyncio
import functools
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from grantkey.http.routing import is_upload
from grantkey.settings import Settings

log = logging.getLogger("grantkey.http")
ABORT_EXTENSION = "grantkey.abort"
_REASONS = {408: b"Request Timeout", 414: b"URI Too Long",
            431: b"Request Header Fields Too Large"}


PARSED_URL_BYTES = 60_000  # httptools.parse_url takes less than 65,536


class HeadTooLarge(Exception):
    pass


@functools.cache
def _limits() -> tuple[int, int, float, float]:
    """(URL bytes, header bytes, head seconds, body seconds), from the worker's GRANTKEY_*
    environment."""
    settings = Settings.from_env()
    return (url_limit(settings), settings.max_header_bytes, settings.header_timeout,
            settings.body_timeout)


def url_limit(settings: Settings) -> int:
    """Room for the longest `q` percent-encoded (three bytes for each of its bytes) and the
    rest of a URL: the SDK sends COPY statements in the URL, however long."""
    return 3 * settings.max_query_bytes + 8192


class _HeadHeldTransport:
    """The transport as one response cycle sees it: its first write (the head, or a 100
    Continue) is held until the next write, which carries it, or the end of the loop's
    turn; anything else the cycle does with the transport (close, abort, ...) first sends
    what is held, so bytes always leave in order."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._first = True

    def write(self, data: bytes) -> None:
        if self._first:
            self._first = False
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
            return
        if self._held is not None:
            data, self._held = self._held + data, None
        self._transport.write(data)

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def __getattr__(self, name: str) -> object:
        self.flush()
        return getattr(self._transport, name)


class BoundedHttpProtocol(HttpToolsProtocol):
    """See the module docstring. Used by `grantkey serve` for every worker."""

    _head_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None
    _url_bytes = 0
    _header_bytes = 0
    _in_head = False
    _lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        self._disarm_body_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # for answers that must give up on a client that stopped reading (see sql_api)
        self.scope["extensions"] = {ABORT_EXTENSION: {"abort": self._abort}}
        self._url_bytes = self._header_bytes = 0
        self._in_head = True
        answering = self.cycle is not None and not self.cycle.response_complete
        if self._head_timer is None and not answering:  # pipelined: armed at the answer's end
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > _limits()[0]:
            self._refuse(414, f"The request URL is longer than {_limits()[0]:,} bytes: send "
                              "long SQL queries in a POST body")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > _limits()[1]:
            self._refuse(431, "The request's header fields are too large")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        # httptools' URL parser counts in 16 bits: it fails on 64 KiB. A long origin-form
        # URL's query string (the SDK's COPY statements) is split off here instead
        long_query = None
        if len(self.url) > PARSED_URL_BYTES:
            path, _, rest = self.url.partition(b"?")
            if not path.startswith(b"/") or len(path) > PARSED_URL_BYTES:  # no parser takes it
                self._refuse(414, f"The request URL is longer than {PARSED_URL_BYTES:,} bytes "
                                  "outside a query string: send long SQL queries in the query "
                                  "string or a POST body")
            self.url, long_query = path, rest.partition(b"#")[0]
        super().on_headers_complete()
        if long_query is not None:
            self.scope["query_string"] = long_query
        if self.cycle is not None:  # its task has not run yet
            self.cycle.transport = _HeadHeldTransport(self.transport, self.loop)  # type: ignore[assignment]
        # the body (if any) has its own deadline; on_message_complete disarms it. An upload
        # (copyfrom) streams for as long as it takes: its handler stops one that stalls
        if not is_upload(self.scope["path"]):
            self._body_timer = self.loop.call_later(_limits()[3], self._body_too_slow)

    def on_message_complete(self) -> None:
        self._disarm_body_timer()
        super().on_message_complete()
        if self._lingering:  # the rest of an upload answered early has come
            self._lingering = False
            self._arm_head_timer()

    def on_response_complete(self) -> None:
        upload_goes_on = (self.cycle is not None and self.cycle.more_body
                          and is_upload(self.scope["path"]))
        super().on_response_complete()
        if upload_goes_on and not self.transport.is_closing():
            # answered before the upload's end (an error): its rest is read and dropped for
            # at most GRANTKEY_BODY_TIMEOUT seconds more (time for the client to read the
            # answer), then the connection is dropped; on_message_complete disarms this and
            # arms the next head's deadline (not before: the rest is no head)
            self._disarm_head_timer()
            self._lingering = True
            self._body_timer = self.loop.call_later(_limits()[3], self._abort)
        self._url_bytes = 0  # bytes before the next head (a stray CRLF) do not count as one
        if not self.transport.is_closing():  # the next request's head has its own deadline
            self._arm_head_timer()

    def _disarm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_too_slow(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started:
            self._abort()  # the answer began before the body ended: nothing better to send
        else:
            self._answer_and_close(408, "The request body did not arrive in time")

    def _flush_held(self) -> None:
        """Writes of the protocol itself come after what the answer's cycle holds."""
        if self.cycle is not None and isinstance(self.cycle.transport, _HeadHeldTransport):
            self.cycle.transport.flush()

    def send_400_response(self, msg: str) -> None:
        self._flush_held()
        if not self.transport.is_closing():  # not after our own 431
            super().send_400_response(msg)

    def _abort(self) -> None:
        """Drop the connection now, unsent bytes included (close() would wait for a client
        that reads nothing). uvicorn then sees a disconnect: the app's pending send returns."""
        if not self.transport.is_closing():
            log.info("dropped a client that stopped reading the answer")
        self.transport.abort()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(_limits()[2], self._head_too_slow)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self._in_head
                                           and not self.cycle.response_complete):
            return  # a request is being answered: its time is the handler's
        if self._in_head or self._url_bytes == 0:
            self._answer_and_close(408, "The request head did not arrive in time")

    def _refuse(self, status: int, message: str) -> None:
        log.info("refused a request head: %s", message)
        self._answer_and_close(status, message)
        raise HeadTooLarge(message)  # stops the parser (uvicorn then sends nothing more)

    def _answer_and_close(self, status: int, message: str) -> None:
        self._disarm_head_timer()
        self._flush_held()
        if self.transport.is_closing():
            return
        body = message.encode("ascii")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, _REASONS[status], len(body), body))
        self.transport.close()
