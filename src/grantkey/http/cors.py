"""CORS for every answer (`Access-Control-Allow-Origin: *`, unless the answer names its
origin: a key restricted to web origins, `context.endpoint`); any OPTIONS request is 200."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

ALLOW_HEADERS = "Authorization, Content-Type, X-Requested-With"
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
ALLOW_ORIGIN = (b"access-control-allow-origin", b"*")


def with_allow_origin(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` with `Access-Control-Allow-Origin: *` unless they name an origin already."""
    if not any(name.lower() == ALLOW_ORIGIN[0] for name, _ in headers):
        headers.append(ALLOW_ORIGIN)
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
                message["headers"] = with_allow_origin(list(message.get("headers", [])))
            await send(message)

        await self.app(scope, receive, with_cors)
