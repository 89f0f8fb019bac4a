"""Maps API named maps (templates): CRUD, instantiation, direct tiles (`carto-compat.md`
§8). Served before the layergroup routes: `named` is never a layergroup id."""

from __future__ import annotations

from starlette.responses import Response
from starlette.routing import Route

from grantkey.domain.keys import Principal
from grantkey.domain.tiles import parse_tile
from grantkey.http.auth import refuse_outside
from grantkey.http.context import Call, Handler, RequestHandler, endpoint
from grantkey.http.errors import Family, json_response
from grantkey.http.maps_api import (
    EXPOSED,
    created,
    json_body,
    layergroup_answer,
    maps_errors,
    tile_answer,
)
from grantkey.http.routing import FastRoute
from grantkey.services.named_maps import Admit


def _name(call: Call) -> str:
    return str(call.request.path_params["name"])


def _auth_token(call: Call) -> str | None:
    return call.params.query.get("auth_token")


async def create_template(call: Call) -> Response:
    name = await call.services.named_maps.create(call.principal, json_body(call))
    return json_response({"template_id": name}, headers={"Access-Control-Expose-Headers": EXPOSED})


async def list_templates(call: Call) -> Response:
    return json_response({"template_ids": await call.services.named_maps.names(call.principal)})


async def get_template(call: Call) -> Response:
    template = await call.services.named_maps.get(call.principal, _name(call))
    return json_response({"template": template})


async def update_template(call: Call) -> Response:
    name = await call.services.named_maps.update(call.principal, _name(call), json_body(call))
    return json_response({"template_id": name})


async def delete_template(call: Call) -> Response:
    await call.services.named_maps.delete(call.principal, _name(call))
    return Response(status_code=204)


def admit(call: Call, group: str) -> Admit:
    """A request that acts as a template's publishing key meets that key's restrictions and
    its rate limit (the map draws with the key's authority, so the key's bounds follow)."""
    async def check(publisher: Principal) -> None:
        if publisher.key.restrictions is not None:
            refuse_outside(publisher, publisher.key.restrictions, call.request)
        if publisher.key.rate_limit is not None:
            await call.services.rates.check(publisher, None)

    return check


async def instantiate(call: Call) -> Response:
    """A layergroup of the template, made as its publishing key; the request's own key is
    not what draws it (CARTO: open templates need none)."""
    params = call.params.json_body if call.params.json_body is not None else {}
    layergroup, publisher = await call.services.named_maps.instantiate(
        call.user, _name(call), params, _auth_token(call), admit(call, "maps"))
    answer = layergroup_answer(call, layergroup, publisher, _auth_token(call))
    return created(call, answer, layergroup)


async def named_tile(call: Call) -> Response:
    """`/named/<name>[/<layers>]/<z>/<x>/<y>.mvt`: a tile of the template's defaults."""
    params = call.request.path_params
    coord = parse_tile(str(params["z"]), str(params["x"]), str(params["tile"]))
    layergroup, publisher = await call.services.named_maps.default_layergroup(
        call.user, _name(call), _auth_token(call), admit(call, "tiles"))
    return await tile_answer(call, publisher, layergroup, params.get("layers"), coord)


def routes() -> list[Route]:
    def handle(handler: Handler, limits: str = "maps") -> RequestHandler:
        return endpoint(Family.MAPS, handler, on_error=maps_errors, limits=limits)

    return [
        Route("/api/v1/map/named", handle(list_templates), methods=["GET"]),
        Route("/api/v1/map/named", handle(create_template), methods=["POST"]),
        Route("/api/v1/map/named/{name}", handle(get_template), methods=["GET"]),
        Route("/api/v1/map/named/{name}", handle(update_template), methods=["PUT"]),
        Route("/api/v1/map/named/{name}", handle(delete_template), methods=["DELETE"]),
        Route("/api/v1/map/named/{name}", handle(instantiate), methods=["POST"]),
        FastRoute("/api/v1/map/named/{name}/{z}/{x}/{tile}", handle(named_tile, "tiles"),
                  methods=["GET"]),
        FastRoute("/api/v1/map/named/{name}/{layers}/{z}/{x}/{tile}", handle(named_tile, "tiles"),
                  methods=["GET"]),
    ]
