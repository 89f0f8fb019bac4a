"""The one place errors become HTTP responses, in each API family's CARTO shape."""

from __future__ import annotations

import logging
from enum import Enum

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from grantkey.errors import (
    BadInput,
    BasicUserMismatch,
    DatabaseUnavailable,
    Forbidden,
    GrantkeyError,
    KeyNotFound,
    NotFound,
    PoolExhausted,
    QueryInterrupted,
    SqlError,
    Unauthorized,
    UserNotFound,
    ValidationFailed,
)

log = logging.getLogger("grantkey.http")
JSON_TYPE = "application/json; charset=utf-8"
RETRY_AFTER = "1"  # seconds, on every 503


class Family(Enum):
    AUTH = "auth"  # Auth API v3: {"errors": "...", "errors_cause": null}, 401 empty
    V4 = "v4"  # datasets: the Auth API's shape, 401 with a body
    DATA = "data"  # SQL / Maps API: {"error": ["..."]}
    PLAIN = "plain"  # health, openapi


class PayloadTooLarge(BadInput):
    pass


def json_response(content: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type=JSON_TYPE,
                    headers=headers)


def user_not_found_message(username: str) -> str:
    return (f"Sorry, we can't find grantkey user '{username[:100]}'. "
            "Please check that you have entered the correct domain.")


def _status_and_message(error: GrantkeyError) -> tuple[int, str]:
    if isinstance(error, SqlError):
        return error.status, error.message
    if isinstance(error, PoolExhausted):
        return 429, str(error)
    if isinstance(error, UserNotFound):
        return 404, user_not_found_message(error.username)
    if isinstance(error, KeyNotFound):
        return 404, f"API key not found: {error.name}"
    if isinstance(error, NotFound):
        return 404, str(error)
    if isinstance(error, ValidationFailed):
        return 422, str(error)
    if isinstance(error, PayloadTooLarge):
        return 413, str(error)
    if isinstance(error, BadInput):
        return 400, str(error)
    if isinstance(error, BasicUserMismatch):
        return 403, "permission denied"
    if isinstance(error, Unauthorized):
        return 401, "Unauthorized"
    if isinstance(error, Forbidden):
        return 403, str(error) or "forbidden"
    if isinstance(error, QueryInterrupted):
        return 503, QueryInterrupted.MESSAGE
    if isinstance(error, DatabaseUnavailable):
        return 503, "The database is unavailable; try again shortly."
    return 500, "Internal error"


def render_error(family: Family, error: GrantkeyError) -> Response:
    status, message = _status_and_message(error)
    if status >= 500:
        log.error("request failed: %s", type(error).__name__)
    if family is Family.AUTH and isinstance(error, Unauthorized):
        return Response(status_code=401)  # CARTO: empty body on any Auth API 401
    # the database is back within seconds (or being restarted): tell clients when to retry
    headers = {"Retry-After": RETRY_AFTER} if status == 503 else None
    if family in (Family.AUTH, Family.V4):
        return json_response({"errors": message, "errors_cause": None}, status, headers)
    body: dict[str, object] = {"error": [message]}
    if isinstance(error, SqlError):
        for name in ("hint", "detail", "context"):
            if getattr(error, name):
                body[name] = getattr(error, name)
    return json_response(body, status, headers)


async def http_error(request: Request, error: Exception) -> Response:
    """Starlette's own 404 (no such route) and 405 (method), in JSON like every answer."""
    assert isinstance(error, HTTPException)
    return json_response({"error": [error.detail]}, error.status_code, dict(error.headers or {}))


async def client_disconnected(request: Request, error: Exception) -> Response:
    """The client went away before its request body was complete: nothing to answer, and
    not a fault of ours (one line, no traceback)."""
    log.info("client disconnected during the request body: %s %s", request.method,
             request.url.path)
    return Response(status_code=400)


async def unexpected_error(request: Request, error: Exception) -> Response:
    """Last resort: log the type, never send a stack trace."""
    if isinstance(error, ClientDisconnect):
        return await client_disconnected(request, error)
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return json_response({"error": ["Internal error"]}, 500)
