"""Batch SQL jobs (carto-compat.md §10): /api/v2/sql/job (and under /api/v1).

`POST` creates (201), `GET` lists the caller's jobs newest first (the master sees all of its
user's), `GET|DELETE|PUT …/job/<id>` read, cancel, and replace a pending job's query. Any
key with the `sql` grant may use them, except the default public key (no key); a job not
the caller's is unknown (404 `Job with id <id> not found`)."""

from __future__ import annotations

import orjson
from starlette.responses import Response
from starlette.routing import Route

from grantkey.domain.jobs import INVALID
from grantkey.errors import BadInput
from grantkey.http.auth_api import parse_list_query
from grantkey.http.context import Call, Handler, endpoint, require_api
from grantkey.http.errors import Family, json_response
from grantkey.http.paging import pagination_links


def _allowed(call: Call) -> None:
    require_api(call, "sql")


def _measure(value: object) -> int:
    try:
        return len(orjson.dumps(value).decode())
    except orjson.JSONEncodeError:  # nested deeper than any query form: not a valid one
        raise BadInput(INVALID) from None


def _payload_checked(call: Call) -> None:
    """CARTO's measure: the body's JSON, in characters (credentials included); a `query`
    given in the query string counts too."""
    body = call.params.json_body if call.params.json_body is not None else call.params.body
    size = max(_measure(body) if body else 0, _measure({"query": call.params.get("query")}))
    limit = call.services.settings.job_max_payload
    if size > limit:
        raise BadInput(f"Your payload is too large: {size} bytes. Max size allowed is {limit} "
                       f"bytes ({limit // 1024}kb).")


async def create_job(call: Call) -> Response:
    _allowed(call)
    _payload_checked(call)
    job = await call.services.jobs.create(call.principal, call.params.get("query"))
    return json_response(job, 201)


async def list_jobs(call: Call) -> Response:
    _allowed(call)
    query = parse_list_query({k: v for k, v in call.params.query.items()
                              if k in ("page", "per_page")})
    total, jobs = await call.services.jobs.list(call.principal, query.page, query.per_page)
    links = pagination_links(call.request.url, query.page, query.per_page, total)
    return json_response({"total": total, "count": len(jobs), "result": jobs, "_links": links})


def _job_id(call: Call) -> str:
    return str(call.request.path_params["job_id"])


async def read_job(call: Call) -> Response:
    _allowed(call)
    return json_response(await call.services.jobs.get(call.principal, _job_id(call)))


async def cancel_job(call: Call) -> Response:
    _allowed(call)
    return json_response(await call.services.jobs.cancel(call.principal, _job_id(call)))


async def update_job(call: Call) -> Response:
    _allowed(call)
    _payload_checked(call)
    job = await call.services.jobs.replace_query(call.principal, _job_id(call),
                                                 call.params.get("query"))
    return json_response(job)


def routes() -> list[Route]:
    collection = endpoint(Family.DATA, _by_method({"POST": create_job, "GET": list_jobs}),
                          limits="jobs")
    item = endpoint(Family.DATA, _by_method({"GET": read_job, "DELETE": cancel_job,
                                             "PUT": update_job}), limits="jobs")
    return [route for version in ("v2", "v1") for route in (
        Route(f"/api/{version}/sql/job", collection, methods=["GET", "POST"]),
        Route(f"/api/{version}/sql/job/{{job_id}}", item, methods=["GET", "DELETE", "PUT"]))]


def _by_method(handlers: dict[str, Handler]) -> Handler:
    async def handle(call: Call) -> Response:
        method = call.request.method
        return await handlers["GET" if method == "HEAD" else method](call)

    return handle
