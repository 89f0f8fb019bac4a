"""The floor: the same query and JSON shape with no key handling at all.

A bare Starlette route on one pooled connection (per worker) logged in as the master's
role; `/floor-unprepared` is the same without psycopg's automatic prepared statements.
Served by uvicorn exactly like grantkey (same worker count), see throughput.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from psycopg import AsyncRawCursor
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

CONNINFO = os.environ.get("BENCH_FLOOR_CONNINFO", "")
# psycopg prepares a statement run 5 times on one connection; grantkey cannot (DISCARD ALL
# between requests deallocates prepared statements), so /floor-unprepared shows that part
pool = AsyncConnectionPool(CONNINFO, min_size=1, max_size=1, open=False,
                           kwargs={"autocommit": True})
unprepared_pool = AsyncConnectionPool(CONNINFO, min_size=1, max_size=1, open=False,
                                      kwargs={"autocommit": True, "prepare_threshold": None})


async def floor(request: Request) -> Response:
    return await answer(request, pool)


async def floor_unprepared(request: Request) -> Response:
    return await answer(request, unprepared_pool)


async def answer(request: Request, pool: AsyncConnectionPool) -> Response:
    started = time.monotonic()
    async with pool.connection() as conn:
        cur = await conn.execute(request.query_params["q"])
        rows = await cur.fetchall()
        names = [c.name for c in cur.description or []]
        fields = {c.name: {"type": "number", "pgtype": "int4"} for c in cur.description or []}
    body = {"rows": [dict(zip(names, row, strict=True)) for row in rows],
            "time": round(time.monotonic() - started, 3), "fields": fields,
            "total_rows": len(rows)}
    return Response(orjson.dumps(body), media_type="application/json; charset=utf-8")


TILE_SQL = os.environ.get("BENCH_TILE_SQL", "")


async def floor_tile(request: Request) -> Response:
    """The tile statement grantkey runs (bench/tiles.py), bound to z, x, y: the tile's
    floor."""
    return await tile_from(request, pool)


async def floor_tile_unprepared(request: Request) -> Response:
    return await tile_from(request, unprepared_pool)


async def tile_from(request: Request, pool: AsyncConnectionPool) -> Response:
    params = request.path_params
    async with pool.connection() as conn, AsyncRawCursor(conn) as cur:  # $1, $2, $3
        await cur.execute(TILE_SQL.encode(), [params["z"], params["x"], params["y"]])
        row = await cur.fetchone()
    data = bytes(row[0]) if row and row[0] else b""
    if not data:
        return Response(status_code=204)
    return Response(data, media_type="application/x-protobuf")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    await pool.open()
    await unprepared_pool.open()
    yield
    await pool.close()
    await unprepared_pool.close()


app = Starlette(routes=[Route("/floor", floor), Route("/floor-unprepared", floor_unprepared),
                        Route("/tile/{z:int}/{x:int}/{y:int}", floor_tile),
                        Route("/tile-unprepared/{z:int}/{x:int}/{y:int}", floor_tile_unprepared)],
                lifespan=lifespan)
