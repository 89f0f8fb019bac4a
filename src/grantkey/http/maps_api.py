"""Maps API v1: anonymous maps (layergroups) and their vector tiles (`carto-compat.md` §8)."""

from __future__ import annotations

from datetime import UTC
from urllib.parse import quote

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from grantkey.domain.keys import Principal
from grantkey.domain.mapconfig import parse_mapconfig
from grantkey.domain.tiles import TileCoord, parse_layergroup_id, parse_tile, select_layers
from grantkey.errors import BadInput, GrantkeyError, LayergroupNotFound
from grantkey.http import maps_preview
from grantkey.http.context import Call, RequestHandler, endpoint, require_api, services_of
from grantkey.http.errors import JSON_TYPE, Family, render_error
from grantkey.http.routing import FastRoute
from grantkey.http.sql_api import CALLBACK
from grantkey.services.maps import Layergroup

MVT_TYPE = "application/x-protobuf"
TILEJSON_VERSION = "2.2.0"
EXPOSED = "X-Layergroup-Id, Carto-Rate-Limit-Limit, Carto-Rate-Limit-Remaining, " \
          "Carto-Rate-Limit-Reset, Retry-After"


def require_maps(call: Call) -> None:
    require_api(call, "maps", "Forbidden")


def _callback(request: Request) -> str | None:
    callback = request.query_params.get("callback")
    return callback if callback is not None and CALLBACK.fullmatch(callback) else None


def json_body(call: Call) -> object:
    media = call.request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise BadInput("POST data must be of type application/json")
    if call.params.json_body is None:
        raise BadInput("The request body is not valid JSON")
    return call.params.json_body


def _config_of(call: Call) -> object:
    if call.request.method == "GET":
        raw = call.params.query.get("config")
        if raw is None:
            raise BadInput('layergroup GET needs a "config" parameter')
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BadInput("The config parameter is not valid JSON") from None
    return json_body(call)


def _base_url(call: Call) -> str:
    """Where this user's Maps API answers, as the client reached it (path or host form)."""
    path = call.request.url.path
    prefix = path[:path.index("/api/v1/map")]
    return str(call.request.base_url).rstrip("/") + prefix + "/api/v1/map"


def _credential_query(call: Call, layergroup: Layergroup, principal: Principal) -> str:
    """What tile URLs carry for the key that made the map: nothing for the default public
    key, else a tile token of this layergroup (never the key itself)."""
    token = _tile_token(call, layergroup, principal)
    return "" if token is None else "?api_key=" + quote(token, safe="")


def _tile_token(call: Call, layergroup: Layergroup, principal: Principal) -> str | None:
    if principal.key.type == "default":
        return None
    return call.services.tile_tokens.issue(call.user.id, layergroup.hash, principal.token)


def layergroup_answer(call: Call, layergroup: Layergroup, principal: Principal | None = None,
                      auth_token: str | None = None) -> dict[str, object]:
    """The 200 of a new layergroup; its tile URLs carry a tile token of `principal` (the
    requesting key; a named map's publishing key), and a token template's `auth_token`."""
    base = f"{_base_url(call)}/{layergroup.id}"
    query = _credential_query(call, layergroup, principal or call.principal)
    if auth_token is not None:
        query += ("&" if query else "?") + "auth_token=" + quote(auth_token, safe="")
    layers = [{"type": "mapnik", "id": layer.name, "meta": {},
               "tilejson": {"vector": {"tilejson": TILEJSON_VERSION,
                                       "tiles": [f"{base}/{layer.index}/{{z}}/{{x}}/{{y}}.mvt"
                                                 f"{query}"]}}}
              for layer in layergroup.config.layers]
    all_tiles = f"{base}/{{z}}/{{x}}/{{y}}.mvt{query}"
    return {
        "layergroupid": layergroup.id,
        "metadata": {"layers": layers, "dataviews": {}, "analyses": [],
                     "tilejson": {"vector": {"tilejson": TILEJSON_VERSION,
                                             "tiles": [all_tiles]}},
                     "url": {"vector": {"urlTemplate": all_tiles, "subdomains": []}}},
        "last_updated": layergroup.changed_at.astimezone(UTC).isoformat(
            timespec="milliseconds").replace("+00:00", "Z"),
    }


async def create_map(call: Call) -> Response:
    require_maps(call)
    config = parse_mapconfig(_config_of(call),
                             max_sql_bytes=call.services.settings.max_query_bytes)
    layergroup = await call.services.maps.create(call.principal, config)
    return created(call, layergroup_answer(call, layergroup), layergroup)


def created(call: Call, answer: dict[str, object], layergroup: Layergroup) -> Response:
    """A layergroup's 200 (JSONP with a callback), with `X-Layergroup-Id`."""
    body = orjson.dumps(answer)
    headers = {"X-Layergroup-Id": layergroup.id, "Access-Control-Expose-Headers": EXPOSED}
    callback = _callback(call.request)
    if callback is not None:
        return Response(callback.encode() + b"(" + body + b");", headers=headers,
                        media_type="text/javascript; charset=utf-8")
    return Response(body, media_type=JSON_TYPE, headers=headers)


async def _layergroup(call: Call) -> Layergroup:
    token = str(call.request.path_params["lgid"])
    parsed = parse_layergroup_id(token)
    if parsed is None:
        raise LayergroupNotFound(token)
    return await call.services.maps.layergroup(call.user, token, parsed[0])


async def get_tile(call: Call) -> Response:
    require_maps(call)
    params = call.request.path_params
    coord = parse_tile(str(params["z"]), str(params["x"]), str(params["tile"]))
    layergroup = await _layergroup(call)
    if layergroup.template is not None:  # a named map's: still there, and its token
        await call.services.named_maps.check_tile(call.user, layergroup.template,
                                                  call.params.query.get("auth_token"))
    return await tile_answer(call, call.principal, layergroup, params.get("layers"), coord)


async def tile_answer(call: Call, principal: Principal, layergroup: Layergroup,
                      selector: str | None, coord: TileCoord) -> Response:
    layers = select_layers(layergroup.config.layers, selector)
    data = await call.services.maps.tile(principal, layergroup, layers, coord)
    keyed = principal.key.type != "default"
    max_age = call.services.settings.tile_max_age
    headers = {
        "Cache-Control": f"{'private' if keyed else 'public'},max-age={max_age}",
        "Last-Modified": layergroup.last_modified,
        "Vary": "Authorization",
        "Access-Control-Expose-Headers": EXPOSED,
    }
    if not data:
        return Response(status_code=204, headers=headers)
    return Response(data, media_type=MVT_TYPE, headers=headers)


async def preview(call: Call) -> Response:
    """The layergroup drawn by MapLibre GL JS (`maps_preview.py`), its tiles fetched with a
    tile token."""
    require_maps(call)
    layergroup = await _layergroup(call)
    tiles = f"{_base_url(call)}/{layergroup.id}/{{z}}/{{x}}/{{y}}.mvt"
    tiles += _credential_query(call, layergroup, call.principal)
    return maps_preview.page(call.services.settings.maplibre_url, tiles=tiles,
                             layers=[layer.name for layer in layergroup.config.layers],
                             error=None)


def preview_errors(request: Request, error: GrantkeyError) -> Response:
    """A refused preview is a page too, saying why (the Maps API's status and message)."""
    rendered = render_error(Family.MAPS, error)
    message = orjson.loads(rendered.body)["errors"][0]
    return maps_preview.page(services_of(request).settings.maplibre_url, tiles=None,
                             layers=[], status=rendered.status_code,
                             error=f"This map cannot be shown ({rendered.status_code}): "
                                   f"{message}")


def _layergroup_asked(request: Request) -> str | None:
    parsed = parse_layergroup_id(str(request.path_params.get("lgid", "")))
    return None if parsed is None else parsed[0]


def maps_errors(request: Request, error: GrantkeyError) -> Response:
    """Maps errors in their shape; with a JSONP callback, answered 200 inside it."""
    response = render_error(Family.MAPS, error)
    response.headers["Access-Control-Expose-Headers"] = EXPOSED
    callback = _callback(request)
    if callback is None:
        return response
    body = callback.encode() + b"(" + bytes(response.body) + b");"
    return Response(body, status_code=200, media_type="text/javascript; charset=utf-8")


def routes() -> list[Route]:
    create: RequestHandler = endpoint(Family.MAPS, create_map, on_error=maps_errors,
                                      limits="maps")
    tile: RequestHandler = endpoint(Family.MAPS, get_tile, on_error=maps_errors,
                                    tiles_of=_layergroup_asked, limits="tiles")
    shown: RequestHandler = endpoint(Family.MAPS, preview, on_error=preview_errors,
                                     tiles_of=_layergroup_asked, limits="maps")
    return [
        Route("/api/v1/map", create, methods=["GET", "POST"]),
        Route("/api/v1/map/{lgid}/preview", shown, methods=["GET"]),
        FastRoute("/api/v1/map/{lgid}/{z}/{x}/{tile}", tile, methods=["GET"]),
        FastRoute("/api/v1/map/{lgid}/{layers}/{z}/{x}/{tile}", tile, methods=["GET"]),
    ]
