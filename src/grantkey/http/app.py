"""The ASGI application: every API of one grantkey server process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from grantkey import __version__
from grantkey.errors import DatabaseUnavailable, SetupError
from grantkey.http import (
    audit_api,
    auth_api,
    copy_api,
    datasets_api,
    jobs_api,
    maps_api,
    named_maps_api,
    sql_api,
)
from grantkey.http.collector import tune_collector
from grantkey.http.context import services_of
from grantkey.http.cors import CorsMiddleware
from grantkey.http.errors import (
    RETRY_AFTER,
    client_disconnected,
    http_error,
    json_response,
    unexpected_error,
)
from grantkey.http.fast_path import GrantkeyApp
from grantkey.http.openapi import openapi
from grantkey.http.routing import for_every_user
from grantkey.services.container import Services
from grantkey.services.notifications import listen_for_revocations
from grantkey.settings import Settings

log = logging.getLogger("grantkey.server")


async def health(request: Request) -> Response:
    """Ready: this process can serve (PostgreSQL answers). `/health` and `/health/ready`."""
    cluster = services_of(request).cluster
    try:
        await cluster.ping()
        postgis = await cluster.postgis_available()
    except DatabaseUnavailable:
        return json_response({"status": "unavailable", "postgres": "unreachable"}, 503,
                             {"Retry-After": RETRY_AFTER})
    return json_response({"status": "ok", "postgres": "ok", "postgis": postgis,
                          "version": __version__})


async def live(request: Request) -> Response:
    """Live: the process answers (whatever PostgreSQL does); restart it only if not."""
    return json_response({"status": "live", "version": __version__})


async def shut_down(tasks: list[asyncio.Task[None]], close: Callable[[], Awaitable[None]],
                    seconds: float) -> bool:
    """Cancel the background tasks, then close the services, all within one deadline: a
    process told to stop must exit, whatever a connection or a cleanup does. What is still
    running at the deadline is cancelled and left (logged). True if all ended in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=seconds)
    stuck = [task.get_name() for task in tasks if not task.done()]
    closing = asyncio.ensure_future(close())
    await asyncio.wait([closing], timeout=max(0.0, deadline - loop.time()))
    if not closing.done():
        closing.cancel()
        stuck.append("closing the services")
    elif not closing.cancelled() and closing.exception() is not None:
        log.warning("closing the services failed: %s", type(closing.exception()).__name__)
    if stuck:
        log.warning("shutdown: still running after %g s, abandoned: %s", seconds,
                    ", ".join(stuck))
    return not stuck


def create_app(settings: Settings | None = None) -> GrantkeyApp:
    """Build the app. Settings come from GRANTKEY_* (serve sets them for every worker)."""
    settings = settings or Settings.from_env()
    if not settings.database_url:
        raise SetupError("GRANTKEY_DATABASE_URL is not set (`grantkey serve` sets it)")
    services = Services(settings, settings.database_url)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await services.open(migrate=False)
        tune_collector()
        tasks = [asyncio.create_task(services.cluster.watch_forever(), name="watch"),
                 asyncio.create_task(listen_for_revocations(services), name="listen"),
                 asyncio.create_task(services.pools.reap_forever(), name="reap"),
                 asyncio.create_task(services.revoker.retry_forever(), name="retry"),
                 asyncio.create_task(services.maps.expire_forever(), name="expire-maps"),
                 asyncio.create_task(services.jobs.purge_forever(), name="purge-jobs"),
                 asyncio.create_task(services.usage.flush_forever(), name="usage")]
        if settings.job_runners > 0:
            tasks.append(asyncio.create_task(services.job_runner.run_forever(), name="jobs"))
        try:
            yield
        finally:
            await shut_down(tasks, services.close, settings.shutdown_seconds)

    app = GrantkeyApp(
        routes=[Route("/health", health, methods=["GET"]),
                Route("/health/ready", health, methods=["GET"]),
                Route("/health/live", live, methods=["GET"]),
                Route("/openapi.json", openapi, methods=["GET"]),
                *for_every_user([*auth_api.routes(), *audit_api.routes(),
                                 *sql_api.routes(sql_api.handler()), *copy_api.routes(), *jobs_api.routes(),
                                 *datasets_api.routes(),
                                 *named_maps_api.routes(), *maps_api.routes()])],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, ClientDisconnect: client_disconnected,
                            Exception: unexpected_error},
        middleware=[Middleware(CorsMiddleware)],
    )
    app.state.services = services
    return app
