"""CORS for every answer (`Access-Control-Allow-Origin: *`, unless the answer names its
origin: a key restricted to web origins, `context.endpoint`; a rate limit's headers
exposed to scripts); any OPTIONS request is 200."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

ALLOW_HEADERS = "Authorization, Content-Type, X-Requested-With"
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
ALLOW_ORIGIN = (b"access-control-allow-origin", b"*")


# an answer with a rate limit's headers lets browsers' scripts read them (carto-compat §11)
RATE_HEADERS = b"Carto-Rate-Limit-Limit, Carto-Rate-Limit-Remaining, Carto-Rate-Limit-Reset, " \
    b"Retry-After"
EXPOSE = b"access-control-expose-headers"


def with_cors_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` with `Access-Control-Allow-Origin: *` unless they name an origin already,
    and, when they carry a rate limit's headers, `Access-Control-Expose-Headers` naming
    them (one walk over the headers, on every answer)."""
    has_origin, exposed, limited = False, -1, False
    for index, (name, _) in enumerate(headers):
        name = name.lower()
        if name == ALLOW_ORIGIN[0]:
            has_origin = True
        elif name == EXPOSE:
            exposed = index
        elif name == b"carto-rate-limit-limit":
            limited = True
    if not has_origin:
        headers.append(ALLOW_ORIGIN)
    if limited:
        if exposed < 0:
            headers.append((EXPOSE, RATE_HEADERS))
        elif b"carto-rate-limit-limit" not in headers[exposed][1].lower():
            headers[exposed] = (EXPOSE, headers[exposed][1] + b", " + RATE_HEADERS)
    return headers


class CorsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":
            await send({"type": "http.response.start", "status": 200, "headers": [
                ALLOW_ORIGIN,
                (b"access-control-allow-headers", ALLOW_HEADERS.encode()),
                (b"access-control-allow-methods", ALLOW_METHODS.encode()),
                (b"content-length", b"0"),
            ]})
            await send({"type": "http.response.body", "body": b""})
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = with_cors_headers(list(message.get("headers", [])))
            await send(message)

        await self.app(scope, receive, with_cors)
