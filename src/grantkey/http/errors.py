"""The one place errors become HTTP responses, in each API family's CARTO shape."""

from __future__ import annotations

import logging
from enum import Enum

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from grantkey.errors import (
    TIMEOUT_MESSAGE,
    BasicUserMismatch,
    Forbidden,
    GrantkeyError,
    LayerFailed,
    RateLimited,
    SqlError,
    Unauthorized,
)

log = logging.getLogger("grantkey.http")
JSON_TYPE = "application/json; charset=utf-8"
RETRY_AFTER = "1"  # seconds, on every 503


class Family(Enum):
    AUTH = "auth"  # Auth API v3: {"errors": "...", "errors_cause": null}, 401 empty
    V4 = "v4"  # datasets: the Auth API's shape, 401 with a body
    DATA = "data"  # SQL API: {"error": ["..."]}
    MAPS = "maps"  # Maps API: {"errors": ["..."], "errors_with_context": [{...}]}
    PLAIN = "plain"  # health, openapi


def json_response(content: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type=JSON_TYPE,
                    headers=headers)


def _status_and_message(error: GrantkeyError) -> tuple[int, str]:
    return error.status, error.public_message()


def render_error(family: Family, error: GrantkeyError) -> Response:
    status, message = _status_and_message(error)
    if status >= 500:
        log.error("request failed: %s", type(error).__name__)
    if family is Family.AUTH and isinstance(error, Unauthorized):
        return Response(status_code=401)  # CARTO: empty body on any Auth API 401
    # the database is back within seconds (or being restarted): tell clients when to retry
    headers = {"Retry-After": RETRY_AFTER} if status == 503 else error.headers() or None
    if family in (Family.AUTH, Family.V4):
        document: dict[str, object] = {"errors": message, "errors_cause": None}
        if error.hint:
            document["hint"] = error.hint
        return json_response(document, status, headers)
    if family is Family.MAPS:
        return render_maps_error(error, headers)
    body: dict[str, object] = {"error": [message]}
    for name in ("hint", "detail", "context"):
        if getattr(error, name, None):
            body[name] = getattr(error, name)
    return json_response(body, status, headers)


def _maps_status(error: GrantkeyError) -> int:
    """CARTO's Maps API rule for a query's error: 403 when it says `permission denied` (read
    from the SQLSTATE too, as the SQL API does: not from words inside a value), 404 for
    `does not exist`, 429 for the time limit, else 400."""
    if not isinstance(error, SqlError):
        return error.status
    if error.status in (403, 429):  # 403: SQLSTATE 42501 saying so (db/sql_errors.py)
        return error.status
    if "does not exist" in error.message:
        return 404
    return 400 if error.status < 500 else error.status


def _maps_context(error: GrantkeyError, message: str) -> dict[str, object]:
    if isinstance(error, BasicUserMismatch):
        return {"type": "auth", "subtype": "api-key-username-mismatch", "message": message}
    if isinstance(error, Unauthorized):
        return {"type": "auth", "subtype": "api-key-not-found", "message": message}
    if isinstance(error, Forbidden) and message == "Forbidden":
        return {"type": "auth", "subtype": "api-key-does-not-grant-access", "message": message}
    if isinstance(error, SqlError) and message == TIMEOUT_MESSAGE:
        return {"type": "limit", "subtype": "datasource", "message": message}
    if isinstance(error, RateLimited):
        return {"type": "limit", "subtype": "rate-limit", "message": message}
    if isinstance(error, LayerFailed):
        return {"type": "layer", "message": message,
                "layer": {"id": error.layer_id, "index": error.index, "type": "mapnik"}}
    return {"type": "unknown", "message": message}


def render_maps_error(error: GrantkeyError, headers: dict[str, str] | None) -> Response:
    """The Maps API's shape (`carto-compat.md` §8)."""
    message = "Forbidden" if isinstance(error, BasicUserMismatch) else error.public_message()
    context = _maps_context(error, message)
    if error.hint:
        context["hint"] = error.hint
    body = {"errors": [message], "errors_with_context": [context]}
    return json_response(body, _maps_status(error), headers)


async def http_error(request: Request, error: Exception) -> Response:
    """Starlette's own 404 (no such route) and 405 (method), in JSON like every answer."""
    assert isinstance(error, HTTPException)
    return json_response({"error": [error.detail]}, error.status_code, dict(error.headers or {}))


async def client_disconnected(request: Request, error: Exception) -> Response:
    return _disconnected(request)


def _disconnected(request: Request) -> Response:
    """The client went away before its request body was complete: nothing to answer, and
    not a fault of ours (one line, no traceback)."""
    log.info("client disconnected during the request body: %s %s", request.method,
             request.url.path)
    return Response(status_code=400)


async def unexpected_error(request: Request, error: Exception) -> Response:
    """Last resort, outside any API family's endpoint: log the type, never send a stack
    trace."""
    return render_unexpected(Family.DATA, request, error)


def render_unexpected(family: Family, request: Request, error: Exception) -> Response:
    """A bug (not a GrantkeyError): logged with its traceback, answered as the family's
    500; a client gone during its request body is not one."""
    if isinstance(error, ClientDisconnect):
        return _disconnected(request)
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return render_error(family, GrantkeyError())
