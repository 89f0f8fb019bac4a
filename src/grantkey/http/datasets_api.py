"""Datasets API: GET /api/v4/datasets and PATCH /api/v4/datasets/{name}."""

from __future__ import annotations

from starlette.responses import Response
from starlette.routing import Route

from grantkey.errors import BadInput
from grantkey.http.auth_api import parse_list_query
from grantkey.http.context import Call, endpoint
from grantkey.http.errors import Family, json_response
from grantkey.http.paging import pagination_links


async def list_datasets(call: Call) -> Response:
    query = parse_list_query({k: v for k, v in call.params.query.items()
                              if k in ("page", "per_page")})
    page = await call.services.datasets.list(call.principal, query.page, query.per_page)
    links = pagination_links(call.request.url, query.page, query.per_page, page.total)
    return json_response({"total": page.total, "count": len(page.datasets),
                          "result": page.datasets, "_links": links})


async def change_privacy(call: Call) -> Response:
    body = call.params.json_body
    if not isinstance(body, dict):
        raise BadInput("The request body must be a JSON object with 'privacy'")
    schema = body.get("schema", "public")
    if not isinstance(schema, str):
        raise BadInput("'schema' must be a string")
    dataset = await call.services.datasets.set_privacy(
        call.principal, schema, call.request.path_params["name"], body.get("privacy"),
        client=call.client)
    return json_response(dataset)


def routes() -> list[Route]:
    """The datasets API's routes, once: `routing.for_every_user` serves them under each prefix."""
    return [Route("/api/v4/datasets", endpoint(Family.V4, list_datasets), methods=["GET"]),
            Route("/api/v4/datasets/{name}", endpoint(Family.V4, change_privacy),
                  methods=["PATCH"])]
