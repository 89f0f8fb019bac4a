"""The fast path serves exactly the hot routes (the SQL API's and the tiles'), built from the routes the app
serves, and keeps CORS and the last-resort 500 that Starlette's middleware gives every
other route."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from grantkey.http.app import create_app
from grantkey.http.fast_path import FastTable, GrantkeyApp
from grantkey.http.routing import FastRoute, for_every_user, served_routes
from grantkey.settings import Settings


def concrete(path: str) -> str:
    return path.replace("{username}", "ana-1").replace("{id}", "x").replace("{name}", "t")


def test_the_fast_path_matches_every_sql_and_tile_route_and_no_other_route() -> None:
    app = create_app(Settings(database_url="dbname=unused", secret="s" * 40))
    hot_paths: list[str] = []
    other_paths: list[str] = []
    for path, route in served_routes(app.routes):
        is_sql = path.rstrip("/").endswith("/sql")
        is_tile = path.endswith("/{z}/{x}/{tile}")
        assert isinstance(route, FastRoute) == (is_sql or is_tile)  # the hot ones
        (hot_paths if is_sql or is_tile else other_paths).append(concrete(path))
    # SQL: v1 and v2, under /user/<u>, /u/<u> and none, with and without "/"; tiles (of
    # layergroups and of named maps): with and without a layer filter, under the three
    assert len(hot_paths) == 12 + 6 + 6
    assert len(app.fast.entries) == 24
    assert all(app.fast.match("GET", path) for path in hot_paths)
    assert all(app.fast.match("POST", path) for path in hot_paths if path.endswith("sql")
               or path.endswith("sql/"))
    assert not [path for path in other_paths
                if app.fast.match("GET", path) or app.fast.match("POST", path)]
    for near_miss in ("/api/v3/sql", "/user/a/b/api/v2/sql", "/api/v2/sqlx", "/x/ana/api/v2/sql",
                      "/user//api/v2/sql", "/api/v2/sql//", "/api/v1/map/a/1/2",
                      "/api/v1/map/a/b/c/1/2/3.mvt"):
        assert app.fast.match("GET", near_miss) is None
    for method in ("HEAD", "OPTIONS", "PUT", "DELETE"):
        assert app.fast.match(method, "/api/v2/sql") is None
    assert app.fast.match("POST", "/api/v1/map/0a:1/0/0/0.mvt") is None  # tiles: GET only


async def tile(request: Request) -> Response:
    return Response("tile")


def test_another_hot_route_joins_the_table_under_every_prefix() -> None:
    """A route flagged as fast (tiles, later) is matched with its parameters converted, in
    every form the app serves it, without a pattern written for it."""
    table = FastTable(for_every_user([
        FastRoute("/api/v1/map/{token}/{z:int}/{x:int}/{y:int}.mvt", tile, methods=["GET"]),
        Route("/api/v1/map/{token}", tile, methods=["GET", "POST"])]))
    for prefix, username in (("", None), ("/user/ana", "ana"), ("/u/ana", "ana")):
        found = table.match("GET", f"{prefix}/api/v1/map/abc/3/4/5.mvt")
        assert found is not None
        handler, params = found
        assert handler is tile
        expected: dict[str, object] = {"token": "abc", "z": 3, "x": 4, "y": 5}
        if username is not None:
            expected["username"] = username
        assert params == expected
        assert table.match("POST", f"{prefix}/api/v1/map/abc/3/4/5.mvt") is None  # GET only
        assert table.match("GET", f"{prefix}/api/v1/map/abc") is None  # not a hot route
        assert table.match("GET", f"{prefix}/api/v1/map/abc/3/4/y.mvt") is None


def test_a_name_with_a_line_break_still_takes_the_fast_path() -> None:
    table = FastTable(for_every_user([FastRoute("/api/v2/sql", tile, methods=["GET"])]))
    assert table.match("GET", "/user/a\nb/api/v2/sql") == (tile, {"username": "a\nb"})


async def raising_handler(request: Request) -> Response:
    raise RuntimeError("boom: a bug in the handler")


async def echo_handler(request: Request) -> Response:
    return Response(str(request.path_params.get("username")), media_type="text/plain")


def app_with(handler: Callable[[Request], Awaitable[Response]]) -> GrantkeyApp:
    async def other(request: Request) -> Response:
        return Response("other")

    return GrantkeyApp(routes=[Route("/health", other),
                               *for_every_user([FastRoute("/api/v2/sql", handler,
                                                          methods=["GET", "POST"]),
                                                FastRoute("/api/v1/sql", handler,
                                                          methods=["GET", "POST"])])])


def requests_to(app: GrantkeyApp, *calls: tuple[str, str]) -> list[httpx.Response]:
    async def send_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [await client.request(method, path) for method, path in calls]

    return asyncio.run(send_all())


def test_an_unexpected_error_is_a_json_500_with_cors_and_no_trace() -> None:
    (response,) = requests_to(app_with(raising_handler), ("GET", "/user/ana/api/v2/sql?q=x"))
    assert response.status_code == 500
    assert response.json() == {"error": ["Internal error"]}
    assert response.headers["access-control-allow-origin"] == "*"
    assert "boom" not in response.text


def test_the_username_comes_from_the_path_and_other_requests_reach_starlette() -> None:
    prefixed, bare, other, head = requests_to(
        app_with(echo_handler), ("POST", "/u/ana/api/v1/sql/"), ("GET", "/api/v2/sql"),
        ("GET", "/health"),
        ("HEAD", "/api/v2/sql"))  # not a fast method: Starlette's router
    assert (prefixed.text, bare.text) == ("ana", "None")
    assert prefixed.headers["access-control-allow-origin"] == "*"
    assert other.text == "other"
    assert head.status_code == 200 and "access-control-allow-origin" not in head.headers
