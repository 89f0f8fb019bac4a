"""The one place a request's credential is found and resolved to a principal.

Order (first match wins): Authorization Basic (token = password) or Bearer; query
`api_key` (data APIs also `map_key`); body `api_key`. With none: the default public key
on data APIs, 401 on the Auth API. A present Authorization header never falls through.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
from dataclasses import dataclass

from starlette.requests import Request

from grantkey.domain.keys import Principal, User
from grantkey.domain.restrictions import Restrictions, request_origin
from grantkey.domain.tokens import DEFAULT_PUBLIC_TOKEN
from grantkey.errors import BasicUserMismatch, Forbidden, Unauthorized
from grantkey.http.params import Params, header
from grantkey.services.container import Services
from grantkey.services.tile_tokens import is_tile_token


@dataclass(frozen=True)
class Credential:
    token: str | None
    source: str


def _from_authorization(header: str, username: str) -> Credential:
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return Credential(value, "bearer")
    if scheme.lower() != "basic":
        raise Unauthorized("unsupported Authorization scheme")
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise Unauthorized("malformed Basic credentials") from None
    basic_user, colon, token = decoded.partition(":")
    if not colon or not token:
        raise Unauthorized("malformed Basic credentials")
    if basic_user != username:
        raise BasicUserMismatch("Basic username is not the target user")
    return Credential(token, "basic")


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def extract_credential(
    authorization: str | None, params: Params, username: str, *, data_api: bool
) -> Credential:
    if authorization is not None:
        return _from_authorization(authorization, username)
    names = ("api_key", "map_key") if data_api else ("api_key",)
    for name in names:
        token = _text(params.query.get(name))
        if token:
            return Credential(token, "query")
    for name in names:
        token = _text(params.body.get(name))
        if token:
            return Credential(token, "body")
    return Credential(None, "none")


class LookupCharge:
    """A request's one charge to its client address's look-up bucket, taken before its
    first database look-up (of the user or of the token), if any."""

    def __init__(self, services: Services, request: Request) -> None:
        self.services = services
        self.request = request
        self.taken = False

    async def __call__(self) -> None:
        if not self.taken:
            self.taken = True
            await self.services.rates.check_lookup(client_address(self.request))


async def resolve_principal(
    request: Request, services: Services, user: User, params: Params, *, data_api: bool,
    tiles_of: str | None = None, charge: LookupCharge | None = None,
) -> Principal:
    """`tiles_of`: the layergroup whose tiles the request asks for; there (only) a tile
    token stands for the key it was issued for (`services/tile_tokens.py`)."""
    credential = extract_credential(
        header(request, b"authorization"), params, user.username, data_api=data_api
    )
    token = credential.token
    if token is None:
        if not data_api:
            raise Unauthorized("no credential")
        token = DEFAULT_PUBLIC_TOKEN
    elif is_tile_token(token):
        token = services.tile_tokens.open(user.id, tiles_of, token)
    before_lookup = charge if charge is not None else LookupCharge(services, request)
    # The Auth API always asks the database; data APIs may use the cache because
    # PostgreSQL itself refuses a revoked key's login.
    principal = await services.resolver.resolve(user, token, fresh=not data_api,
                                                before_lookup=before_lookup)
    if principal.key.restrictions is not None:
        refuse_outside(principal, principal.key.restrictions, request)
    return principal


def refuse_outside(principal: Principal, restrictions: Restrictions, request: Request) -> None:
    """403 for a request from a client address or web page the key is not for (before any
    work as the key)."""
    if restrictions.ips:
        address = client_address(request)
        if not restrictions.allows_address(address):
            name = principal.key.name[:100]
            raise Forbidden(f'key "{name}" may not be used from {address}: its restrictions '
                            f"allow {', '.join(str(n) for n in restrictions.ips)}")
    if not restrictions.origins:
        return
    origin = request_origin(header(request, b"origin"), header(request, b"referer"))
    if not restrictions.allows_origin(origin):
        name = principal.key.name[:100]
        where = (f"from {origin}" if origin is not None
                 else "with no Origin or Referer header (not from a web page)")
        raise Forbidden(f'key "{name}" may be used only from web pages of '
                        f"{', '.join(restrictions.origins)}; this request comes {where}")


def client_address(request: Request) -> str:
    """The client's address (uvicorn's view: its --forwarded-allow-ips decides which
    proxies' X-Forwarded-For it believes), or `unknown`: only an IP address is ever used, so
    no request passes for the command line (`cli`) or writes free text anywhere."""
    client = request.scope.get("client")  # (host, port), as Starlette's request.client
    return _canonical(client[0] if client else "")


@functools.lru_cache(maxsize=4096)
def _canonical(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return "unknown"
