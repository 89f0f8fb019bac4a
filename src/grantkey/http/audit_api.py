"""The audit log, read-only: GET /api/v3/audit (master key only), paginated like the key
list, newest first; `name` keeps the events made by that key or about it, `type` the
events of those types (comma-separated)."""

from __future__ import annotations

from starlette.responses import Response
from starlette.routing import Route

from grantkey.domain.keys import KEY_NAME_MAX_LENGTH
from grantkey.http.auth_api import parse_list_query, wrong_parameter
from grantkey.http.context import Call, endpoint
from grantkey.http.documents import audit_document
from grantkey.http.errors import Family, json_response
from grantkey.http.paging import pagination_links
from grantkey.services.events import EVENT_TYPES, AuditQuery

COLLECTION = "/api/v3/audit"


def parse_audit_query(query: dict[str, str]) -> AuditQuery:
    paging = parse_list_query({k: v for k, v in query.items() if k in ("page", "per_page")})
    name = query.get("name")
    if name is not None and not _plausible_key_name(name):
        raise wrong_parameter("name")
    types = None
    if "type" in query:
        types = [item.strip() for item in query["type"].split(",") if item.strip()]
        if not types or any(item not in EVENT_TYPES for item in types):
            raise wrong_parameter("type", list(EVENT_TYPES))
    return AuditQuery(key_name=name, types=types, page=paging.page, per_page=paging.per_page)


def _plausible_key_name(name: str) -> bool:
    """A name some key could have had (PostgreSQL text holds no NUL). Not `isprintable()`:
    a key's name may hold space separators (U+00A0, U+3000), which it calls unprintable;
    the name is compared as a parameter, so any other text just matches nothing."""
    return 0 < len(name) <= KEY_NAME_MAX_LENGTH and "\x00" not in name


async def list_events(call: Call) -> Response:
    query = parse_audit_query(call.params.query)
    page = await call.services.events.read(call.principal, query)
    links = pagination_links(call.request.url, query.page, query.per_page, page.total)
    result = [audit_document(entry) for entry in page.entries]
    return json_response({"total": page.total, "count": len(result), "result": result,
                          "_links": links})


def routes() -> list[Route]:
    """Once: `routing.for_every_user` serves it under each prefix."""
    return [Route(COLLECTION, endpoint(Family.AUTH, list_events), methods=["GET"])]
