"""COPY endpoints of the SQL API (carto-compat.md §9): /api/v2/sql/copyfrom and
/api/v2/sql/copyto (and under /api/v1).

copyfrom streams the request body into the client's COPY … FROM STDIN as it arrives,
gunzipped when it says `Content-Encoding: gzip`, never held whole in memory; the size limit
counts the bytes received (compressed ones for gzip, as CARTO does). The body must keep
coming: GRANTKEY_BODY_TIMEOUT seconds without a byte end the upload (the protocol's
whole-body deadline does not apply to it, the COPY time limit does). Any failure before the
COPY's end (the client went away, bad gzip, the limit) aborts the COPY: nothing is written.

copyto streams the output of COPY … TO STDOUT. An error before its first byte is a normal
SQL API error; one after it cuts the answer short (no final chunk), never a complete-looking
200 with an error appended.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator, Awaitable
from urllib.parse import quote

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from grantkey.errors import BadInput
from grantkey.http.context import Call, endpoint, require_api
from grantkey.http.errors import Family, json_response
from grantkey.http.params import header
from grantkey.http.routing import UPLOAD_PATHS
from grantkey.http.sql_api import QueryResponse, check_query_text, cut_short
from grantkey.services.copy import RunningCopy

DEFAULT_FILENAME = "carto-sql-copyto.dmp"
GUNZIP_BLOCK = 1 << 20  # most bytes one gunzip step makes from a chunk (no bomb in memory)
GZIP_MAGIC = b"\x1f\x8b"


def copy_statement(call: Call, raw: object) -> str:
    """The COPY statement in `q`, checked as CARTO does (it must start with "COPY "), and
    within the SQL API's limits."""
    if not isinstance(raw, str):
        raise BadInput("SQL is missing")
    if not raw.upper().startswith("COPY "):
        raise BadInput("SQL must start with COPY")
    check_query_text(call, raw)
    return raw


def pretty_size(size: int) -> str:
    """2147483648 → "2 GB" (CARTO's wording of its limit), else the exact bytes."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


def too_large(limit: int) -> BadInput:
    return BadInput(f"COPY FROM maximum POST size of {pretty_size(limit)} exceeded")


def _gzip_error(error: zlib.error | str) -> BadInput:
    reason = str(error).split(": ", 1)[-1] if isinstance(error, zlib.error) else error
    return BadInput(f"Error while gunzipping: {reason}")


async def received(request: Request, limit: int, idle: float) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, at most `limit` bytes, none more than `idle`
    seconds after the last (starlette's ClientDisconnect when the client goes away)."""
    size = 0
    stream = request.stream()
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise BadInput(f"The upload stopped: no data for {idle:g} seconds") from None
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        yield chunk


async def gunzipped(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The data of a gzip stream (several members one after the other too), in steps of
    at most GUNZIP_BLOCK bytes; a broken or truncated stream is a 400."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    async for chunk in chunks:
        pending = chunk
        while pending:
            try:
                yield inflater.decompress(pending, GUNZIP_BLOCK)
            except zlib.error as error:
                raise _gzip_error(error) from None
            pending = inflater.unconsumed_tail
            if inflater.eof and inflater.unused_data:  # the next member
                pending = inflater.unused_data
                if not pending.startswith(GZIP_MAGIC[:len(pending)]):
                    raise _gzip_error("data after the end of the gzip stream")
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    if not inflater.eof:
        raise _gzip_error("unexpected end of file")


def _encoding(request: Request) -> str:
    encoding = (header(request, b"content-encoding") or "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip"):
        raise BadInput(f"Unsupported Content-Encoding: {encoding[:40]} (send gzip or none)")
    return encoding


async def copy_from(call: Call) -> Response:
    require_api(call, "sql")
    statement = copy_statement(call, call.params.query.get("q"))
    encoding = _encoding(call.request)
    settings = call.services.settings
    limit = settings.copy_max_bytes
    declared = header(call.request, b"content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large(limit)
    data = received(call.request, limit, settings.body_timeout)
    if encoding != "identity":
        data = gunzipped(data)
    copied = await call.services.copy.copy_from(call.principal, statement, data)
    return json_response({"time": copied.seconds, "total_rows": copied.rows})


async def unless_client_leaves(request: Request, work: Awaitable[RunningCopy]) -> RunningCopy:
    """`work`'s result, or ClientDisconnect (with `work` cancelled, or its COPY closed) if
    the client hangs up first: before an answer starts, nothing else notices."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left = watcher.done() and not watcher.cancelled() and not task.done()
        watcher.cancel()
        if not task.done():
            task.cancel()  # the client left (or this request is being cancelled)
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if left or task.cancelled() or not task.done():
        try:
            abandoned = await task
        except asyncio.CancelledError:
            raise ClientDisconnect() from None
        await abandoned.aclose()  # it started just as the client left
        raise ClientDisconnect()
    return task.result()


async def copy_to(call: Call) -> Response:
    if call.request.method == "HEAD":  # a COPY run for no reader: never
        return Response(status_code=405, headers={"Allow": "GET, POST"})
    require_api(call, "sql")
    statement = copy_statement(call, call.params.get("q"))
    filename = call.params.get("filename")
    name = filename if isinstance(filename, str) and filename else DEFAULT_FILENAME
    running = await unless_client_leaves(
        call.request, call.services.copy.copy_to(call.principal, statement))
    try:
        headers = {"Content-Disposition": "attachment; filename=" + quote(name, safe="!*'()"),
                   "Vary": "Authorization"}
        return QueryResponse(running, call.services.settings.send_timeout,
                             content=cut_short(running.blocks(), running),
                             media_type="application/octet-stream", headers=headers)
    except BaseException:
        await running.aclose()
        raise


def routes() -> list[Route]:
    upload = endpoint(Family.DATA, copy_from, read_body=False, limits="copy")
    download = endpoint(Family.DATA, copy_to, limits="copy")
    return [*(Route(path, upload, methods=["POST"]) for path in UPLOAD_PATHS),
            *(Route(f"/api/{version}/sql/copyto", download, methods=["GET", "POST"])
              for version in ("v2", "v1"))]
