"""The SQL API's fast path serves exactly the SQL routes, and keeps CORS and the last-resort
500 that Starlette's middleware gives every other route."""

from __future__ import annotations

import asyncio

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from grantkey.http.app import create_app
from grantkey.http.fast_path import SQL_PATH, GrantkeyApp
from grantkey.http.routing import served_routes
from grantkey.settings import Settings


def concrete(path: str) -> str:
    return path.replace("{username}", "ana-1").replace("{id}", "x").replace("{name}", "t")


def test_the_fast_path_matches_every_sql_route_and_no_other_route() -> None:
    app = create_app(Settings(database_url="dbname=unused", secret="s" * 40))
    sql_paths: list[str] = []
    other_paths: list[str] = []
    for path, route in served_routes(app.routes):
        is_sql = route.endpoint is app.sql_handler
        (sql_paths if is_sql else other_paths).append(concrete(path))
    assert len(sql_paths) == 12  # v1 and v2, under /user/<u>, /u/<u> and none, with and without "/"
    assert all(SQL_PATH.fullmatch(path) for path in sql_paths)
    assert not [path for path in other_paths if SQL_PATH.fullmatch(path)]
    for near_miss in ("/api/v3/sql", "/user/a/b/api/v2/sql", "/api/v2/sqlx", "/x/ana/api/v2/sql"):
        assert SQL_PATH.fullmatch(near_miss) is None


async def raising_handler(request: Request) -> Response:
    raise RuntimeError("boom: a bug in the handler")


async def echo_handler(request: Request) -> Response:
    return Response(str(request.path_params.get("username")), media_type="text/plain")


def app_with(handler: object) -> GrantkeyApp:
    async def other(request: Request) -> Response:
        return Response("other")

    app = GrantkeyApp(routes=[Route("/health", other)])
    app.sql_handler = handler  # type: ignore[assignment]
    return app


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
        ("HEAD", "/api/v2/sql"))  # not a fast method: Starlette's router (no route here: 404)
    assert (prefixed.text, bare.text) == ("ana", "None")
    assert prefixed.headers["access-control-allow-origin"] == "*"
    assert other.text == "other"
    assert head.status_code == 404
