"""Auth API v3: /api/v3/api_keys (CARTO-compatible)."""

from __future__ import annotations

from urllib.parse import quote

import orjson
from starlette.responses import Response
from starlette.routing import Route

from grantkey.domain.key_options import parse_duration, read_grace
from grantkey.domain.keys import KEY_TYPES
from grantkey.domain.numbers import strict_int
from grantkey.errors import BadInput, BadListParameter, ValidationFailed
from grantkey.http.context import Call, endpoint
from grantkey.http.documents import key_document, usage_document
from grantkey.http.errors import Family, json_response
from grantkey.http.paging import pagination_links
from grantkey.services.keys import KeyView, ListQuery

COLLECTION = "/api/v3/api_keys"
TYPES = list(KEY_TYPES)
ORDERS = ["type", "name", "updated_at"]
DIRECTIONS = ["asc", "desc"]
MAX_PER_PAGE = 1000
MAX_USAGE_DAYS = 366


def wrong_parameter(name: str, valid: list[str] | None = None) -> BadListParameter:
    message = f"Wrong '{name}' parameter value."
    if valid is not None:
        message += f" Valid values are one of {orjson.dumps(valid).decode().replace(',', ', ')}"
    return BadListParameter(message)


def _positive(raw: str | None, name: str, default: int, maximum: int) -> int:
    if raw is None:
        return default
    value = strict_int(raw)
    if value is None or not 0 < value <= maximum:
        raise wrong_parameter(name)
    return value


def parse_list_query(query: dict[str, str]) -> ListQuery:
    page = _positive(query.get("page"), "page", 1, 10**9)
    per_page = _positive(query.get("per_page"), "per_page", 20, MAX_PER_PAGE)
    order = query.get("order", "updated_at")
    if order not in ORDERS:
        raise wrong_parameter("order", ORDERS)
    direction = query.get("order_direction", "asc")
    if direction not in DIRECTIONS:
        raise wrong_parameter("order_direction", DIRECTIONS)
    types = [item.strip() for item in query.get("type", "").split(",") if item.strip()]
    if any(item not in TYPES for item in types):
        raise wrong_parameter("type", TYPES)
    return ListQuery(types=types or TYPES, order=order, descending=direction == "desc",
                     page=page, per_page=per_page,
                     unused_for=_duration(query.get("unused_for"), "unused_for"),
                     expiring_within=_duration(query.get("expiring_within"), "expiring_within"))


def _duration(raw: str | None, name: str) -> float | None:
    if raw is None:
        return None
    seconds = parse_duration(raw)
    if seconds is None:
        raise BadListParameter(f"Wrong '{name}' parameter value. Use a duration such as 30d, "
                               "12h, 90m or 3600s (at most 36600d)")
    return seconds


def _key_url(call: Call, view: KeyView) -> str:
    url = call.request.url
    path = url.path.rstrip("/")
    base = path[: path.index(COLLECTION) + len(COLLECTION)]
    return str(url.replace(path=f"{base}/{quote(view.record.name, safe='')}", query=""))


async def list_keys(call: Call) -> Response:
    query = parse_list_query(call.params.query)
    page = await call.services.keys.list(call.principal, query)
    links = pagination_links(call.request.url, query.page, query.per_page, page.total)
    result = []
    for view in page.keys:
        document = key_document(view)
        document["_links"] = {"self": _key_url(call, view)}
        result.append(document)
    return json_response({"total": page.total, "count": len(result), "result": result,
                          "_links": links})


async def create_key(call: Call) -> Response:
    body = call.params.json_body
    if not isinstance(body, dict):
        raise BadInput("The request body must be a JSON object with 'name' and 'grants'")
    view = await call.services.keys.create(call.principal, body.get("name"), body.get("grants"),
                                           options=body, client=call.client)
    return json_response(key_document(view), 201)


async def show_key(call: Call) -> Response:
    view = await call.services.keys.show(call.principal, call.request.path_params["name"])
    return json_response(key_document(view))


async def key_usage(call: Call) -> Response:
    """Requests per day and API over the last `days` days (default 30, at most 366)."""
    days = _positive(call.params.query.get("days"), "days", 30, MAX_USAGE_DAYS)
    usage = await call.services.usage.report(call.principal, call.request.path_params["name"],
                                             days)
    return json_response(usage_document(usage))


async def delete_key(call: Call) -> Response:
    await call.services.keys.delete(call.principal, call.request.path_params["name"],
                                    client=call.client)
    return Response(status_code=204)


async def regenerate_token(call: Call) -> Response:
    """CARTO's regeneration (no body) or, with `{"grace_seconds": N}`, one whose old token
    keeps working N seconds (and `"token"`, the current one, where tokens are not kept)."""
    body = call.params.json_body
    if body is None and call.params.body:  # a form: its values are text
        body = {name: int(value) if name == "grace_seconds" and value.isdecimal() else value
                for name, value in call.params.body.items() if isinstance(value, str)}
    grace, problems = read_grace(body, call.services.keys.max_grace)
    if problems:
        raise ValidationFailed(problems)
    old_token = body.get("token") if isinstance(body, dict) else None
    if old_token is not None and not isinstance(old_token, str):
        raise ValidationFailed(["Token must be the key's current token, as a string"])
    view = await call.services.keys.regenerate(call.principal, call.request.path_params["name"],
                                               grace_seconds=grace, old_token=old_token,
                                               client=call.client)
    return json_response(key_document(view))


def routes() -> list[Route]:
    """The Auth API's routes, once: `routing.for_every_user` serves them under each prefix."""
    return [
        Route(COLLECTION, endpoint(Family.AUTH, list_keys), methods=["GET"]),
        Route(COLLECTION, endpoint(Family.AUTH, create_key), methods=["POST"]),
        Route(COLLECTION + "/{name}", endpoint(Family.AUTH, show_key), methods=["GET"]),
        Route(COLLECTION + "/{name}/usage", endpoint(Family.AUTH, key_usage), methods=["GET"]),
        Route(COLLECTION + "/{name}", endpoint(Family.AUTH, delete_key), methods=["DELETE"]),
        Route(COLLECTION + "/{name}/token/regenerate", endpoint(Family.AUTH, regenerate_token),
              methods=["POST"]),
    ]
