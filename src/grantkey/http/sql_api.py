"""SQL API v2: /api/v2/sql (and /api/v1/sql), CARTO-compatible."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from grantkey.domain.numbers import strict_int
from grantkey.domain.sql_text import COPY_REFUSED, starts_a_copy
from grantkey.errors import BadInput, GrantkeyError
from grantkey.http.context import Call, RequestHandler, endpoint, require_api
from grantkey.http.errors import Family, render_error
from grantkey.http.formats import EXTENSIONS, MEDIA_TYPES, WRITERS
from grantkey.http.protocol import ABORT_EXTENSION
from grantkey.http.routing import FastRoute
from grantkey.services.sql import Page, RunningQuery

log = logging.getLogger("grantkey.sql")
CALLBACK = re.compile(r"[A-Za-z_$][A-Za-z0-9_$.]{0,99}")
SAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")
MAX_ROWS_PER_PAGE = 1_000_000


@dataclass(frozen=True)
class SqlParams:
    query: str
    format: str
    format_given: bool
    filename: str | None
    skipfields: set[str]
    dp: int
    rows_per_page: int | None
    page: int
    callback: str | None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None if value is None else str(value)


def _integer(raw: object, name: str, minimum: int, maximum: int) -> int | None:
    text = _text(raw)
    if text is None or text == "":
        return None
    value = strict_int(text)
    if value is None or not minimum <= value <= maximum:
        raise BadInput(f"Invalid {name} parameter: {text[:40]}")
    return value


def check_query_text(call: Call, query: str) -> None:
    """No NUL (PostgreSQL takes none), at most GRANTKEY_MAX_QUERY_BYTES."""
    if "\x00" in query:
        raise BadInput("The sql query contains a NUL character")
    limit = call.services.settings.max_query_bytes
    if len(query.encode("utf-8", "surrogatepass")) > limit:
        raise BadInput(f"The sql query is too long: the limit is {limit} bytes")


def parse_sql_params(call: Call) -> SqlParams:
    params = call.params
    query = _text(params.get("q"))
    if not query or not query.strip():
        raise BadInput("You must indicate a sql query")
    check_query_text(call, query)
    if starts_a_copy(query):
        raise BadInput(COPY_REFUSED)
    raw_format = _text(params.get("format"))
    fmt = (raw_format or "json").lower()
    if fmt not in WRITERS:
        raise BadInput(f"Invalid format: {raw_format}")
    callback = _text(params.query.get("callback"))
    if callback is not None and not CALLBACK.fullmatch(callback):
        raise BadInput("Invalid callback: use a JavaScript identifier")
    skip = {f.strip() for f in (_text(params.get("skipfields")) or "").split(",") if f.strip()}
    dp = _integer(params.get("dp"), "dp", 0, 15)
    return SqlParams(
        query=query, format=fmt, format_given=raw_format is not None,
        filename=_text(params.get("filename")), skipfields=skip,
        dp=6 if dp is None else dp,
        rows_per_page=_integer(params.get("rows_per_page"), "rows_per_page", 1,
                               MAX_ROWS_PER_PAGE),
        page=_integer(params.get("page"), "page", 0, 10**9) or 0,
        callback=callback,
    )


def _disposition(options: SqlParams) -> str:
    extension = EXTENSIONS[options.format]
    if not options.format_given and options.filename is None:
        return f"inline; filename=cartodb-query.{extension}"
    name = SAFE_FILENAME.sub("_", options.filename or "cartodb-query").strip("._") or "download"
    return f"attachment; filename={name}.{extension}"


async def _chunks(running: RunningQuery, options: SqlParams) -> AsyncIterator[bytes]:
    if options.callback:
        yield options.callback.encode() + b"("
    async for chunk in WRITERS[options.format](running, options.skipfields):
        yield chunk
    if options.callback:
        yield b");"


class AnswerCutShort(Exception):
    """An error after the first bytes of a streamed answer (the time limit, a lost
    session): the status line is gone, so the connection is dropped without the final
    chunk, and the client sees an incomplete answer, never a complete-looking one."""


class Streamed(Protocol):
    """What a streamed answer holds until it ends (a query, a COPY): its session."""

    async def aclose(self) -> None: ...


async def cut_short(chunks: AsyncIterator[bytes], running: Streamed) -> AsyncIterator[bytes]:
    """An answer, streamed. An error after the first bytes can only cut it short. The
    session goes back as soon as the last chunk is made (before it is sent)."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as error:
        log.warning("streamed answer cut short: %s", type(error).__name__)
        raise AnswerCutShort from None
    finally:
        await running.aclose()


class QueryResponse(StreamingResponse):
    """A streamed answer that always gives its connection back, even when the client
    disconnects before the body starts (an unstarted generator never runs its finally),
    and that drops a client which reads nothing for `send_timeout` seconds (through the
    protocol's abort extension; the query's own time limit frees its database connection
    meanwhile)."""

    def __init__(self, running: Streamed, send_timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.running = running
        self.send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        abort = scope.get("extensions", {}).get(ABORT_EXTENSION, {}).get("abort")
        loop = asyncio.get_running_loop()

        async def send_or_give_up(message: Message) -> None:
            timer = None if abort is None else loop.call_later(self.send_timeout, abort)
            try:
                await send(message)
            finally:
                if timer is not None:
                    timer.cancel()

        try:
            await super().__call__(scope, receive, send_or_give_up)
        except AnswerCutShort:
            if abort is None:
                raise
            abort()  # no final chunk: the answer cannot look complete
        finally:
            await self.running.aclose()


async def run_sql(call: Call) -> Response:
    require_api(call, "sql")
    options = parse_sql_params(call)
    page = None if options.rows_per_page is None else Page(options.rows_per_page, options.page)
    geojson_digits = options.dp if options.format == "geojson" else None
    running = await call.services.sql.start(call.principal, options.query, page=page,
                                            geojson_digits=geojson_digits)
    try:
        media = ("text/javascript; charset=utf-8" if options.callback
                 else MEDIA_TYPES[options.format])
        headers = {"Content-Disposition": _disposition(options), "Vary": "Authorization"}
        if running.complete:
            # every row is already here: give the connection back first, answer in one piece
            await running.aclose()
            body = b"".join([chunk async for chunk in _chunks(running, options)])
            return Response(body, media_type=media, headers=headers)
        return QueryResponse(running, call.services.settings.send_timeout,
                             content=cut_short(_chunks(running, options), running),
                             media_type=media,
                             headers=headers)
    except BaseException:
        await running.aclose()  # the response never took the query over
        raise


def jsonp_errors(request: Request, error: GrantkeyError) -> Response:
    """With a callback in the query string, errors are answered 200 inside the callback."""
    response = render_error(Family.DATA, error)
    callback = request.query_params.get("callback")
    if callback is None or not CALLBACK.fullmatch(callback):
        return response
    body = callback.encode() + b"(" + bytes(response.body) + b");"
    return Response(body, status_code=200, media_type="text/javascript; charset=utf-8")


def handler() -> RequestHandler:
    return endpoint(Family.DATA, run_sql, on_error=jsonp_errors, limits="sql")


def routes(sql_handler: RequestHandler) -> list[Route]:
    """The SQL API's routes, once: `routing.for_every_user` serves them under each prefix,
    and as `FastRoute`s `fast_path` answers their GET and POST before the router."""
    return [FastRoute(f"/api/{version}/sql", sql_handler, methods=["GET", "POST"])
            for version in ("v2", "v1")]
