"""What every API handler needs first: the services, the target user, params, principal."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from grantkey.domain.keys import Principal, User
from grantkey.domain.rate_limits import Decision
from grantkey.domain.restrictions import request_origin
from grantkey.errors import Forbidden, GrantkeyError
from grantkey.http.auth import LookupCharge, client_address, resolve_principal
from grantkey.http.errors import Family, render_error, render_unexpected
from grantkey.http.params import Params, read_params
from grantkey.services.container import Services


@dataclass
class Call:
    request: Request
    services: Services
    user: User
    params: Params
    principal: Principal

    @property
    def client(self) -> str:
        """The client's address, as the audit log records it (`auth.client_address`)."""
        return client_address(self.request)


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def target_username(request: Request) -> str:
    """From the path (`/user/<u>/`, `/u/<u>/`), else the Host header's first label."""
    username = request.path_params.get("username")
    if username is None:
        host = request.headers.get("host", "").split(":")[0]
        username = host.split(".")[0]
    return str(username)


Handler = Callable[[Call], Awaitable[Response]]
# a key's usage is counted per API group: the rate-limit groups, and these
USAGE_API = {Family.AUTH: "auth", Family.V4: "datasets", Family.DATA: "sql",
             Family.MAPS: "maps", Family.PLAIN: "other"}


ErrorRenderer = Callable[[Request, GrantkeyError], Response]
RequestHandler = Callable[[Request], Awaitable[Response]]


def endpoint(
    family: Family, handler: Handler, on_error: ErrorRenderer | None = None,
    tiles_of: Callable[[Request], str | None] | None = None, read_body: bool = True,
    limits: str | None = None,
) -> RequestHandler:
    """Wrap a handler: resolve who calls, apply the rate limits of the API group `limits`
    (`services/rate_limits.py`; their headers on the answer), and render any error in
    `family`'s shape (a bug as its 500). `tiles_of`: for tile routes, the layergroup asked
    for (where its tile tokens are credentials). `read_body=False`: the body is the
    handler's to stream (an upload), parameters come from the query string only."""

    async def run(request: Request) -> Response:
        services = services_of(request)
        decision: Decision | None = None
        try:
            data_api = family in (Family.DATA, Family.MAPS)
            # data APIs may trust the cache: PostgreSQL refuses a deleted user's key logins
            charge = LookupCharge(services, request)
            user = await services.users.get(target_username(request), cached=data_api,
                                            before_lookup=charge)
            params = await read_params(request, services.settings.max_body_bytes,
                                       read_body=read_body)
            principal = await resolve_principal(
                request, services, user, params, data_api=data_api,
                tiles_of=None if tiles_of is None else tiles_of(request), charge=charge)
            decision = await services.rates.check(principal, limits)
            services.usage.count(principal, limits or USAGE_API[family])
            response = await handler(Call(request, services, user, params, principal))
            if principal.key.restrictions is not None and principal.key.restrictions.origins:
                answer_origin(request, response)
            if decision is not None:  # exposed to browsers by `cors.with_cors_headers`
                response.raw_headers.extend(decision.raw_headers())
            return response
        except GrantkeyError as error:  # a limit's headers on the failure too
            response = (on_error(request, error) if on_error is not None
                        else render_error(family, error))
            # a limit's headers (`cors.with_cors_headers` exposes them to browsers' scripts)
            response.headers.update(error.headers() or (
                {} if decision is None else decision.headers()))
            return response
        except Exception as error:  # a bug: the family's own 500 shape
            return render_unexpected(family, request, error)

    return run


def require_api(call: Call, api: str, message: str = "forbidden") -> None:
    """403 unless the key has the API's grant, with a hint saying what it has."""
    if not call.principal.allows_api(api):
        refused = Forbidden(message)
        refused.hint = call.principal.api_hint(api)
        raise refused


def answer_origin(request: Request, response: Response) -> None:
    """A key restricted to web origins: CORS allows only the page the request came from
    (it matched), not every page."""
    origin = request_origin(request.headers.get("origin"), request.headers.get("referer"))
    if origin is not None:  # always, once the restriction let the request in
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
