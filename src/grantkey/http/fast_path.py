"""The SQL API's hot path: its requests go straight to the handler.

Starlette would take each one through its error and CORS middleware, its exception
middleware and a walk over every route's pattern. The SQL API renders its own errors
already (`context.endpoint`), so for its paths the app does the remaining two jobs itself:
the CORS header, and a 500 for an unexpected exception before the answer started. Every
other request (and HEAD, OPTIONS or any other method on these paths) goes through Starlette
as before; the SQL routes stay registered there too.
"""

from __future__ import annotations

import re

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from grantkey.http.context import RequestHandler
from grantkey.http.cors import ALLOW_ORIGIN
from grantkey.http.errors import unexpected_error

# the paths routing.for_every_user serves sql_api.routes() at (user prefixes from
# routing.USER_PREFIXES, the host form, a trailing slash); tests/unit/test_fast_path.py checks
# it against the served routes. TODO(issue 12 item 3): build this table from the registered
# routes instead of a hand-copied pattern.
SQL_PATH = re.compile(r"(?:/(?:user|u)/(?P<username>[^/]+))?/api/v[12]/sql/?")
FAST_METHODS = frozenset({"GET", "POST"})


class GrantkeyApp(Starlette):
    """Starlette, with the SQL API's requests dispatched before the middleware stack."""

    sql_handler: RequestHandler | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.sql_handler
        match = None
        if (handler is not None and scope["type"] == "http"
                and scope["method"] in FAST_METHODS and not scope.get("root_path")):
            match = SQL_PATH.fullmatch(scope["path"])
        if handler is None or match is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        username = match["username"]
        scope["path_params"] = {} if username is None else {"username": username}
        await self._serve_sql(handler, scope, receive, send)

    async def _serve_sql(self, handler: RequestHandler, scope: Scope, receive: Receive,
                         send: Send) -> None:
        request = Request(scope, receive)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            response = await handler(request)
            response.raw_headers.append(ALLOW_ORIGIN)
            await response(scope, receive, tracked)
        except Exception as error:
            if started:  # the status line is gone: nothing better than ending the answer
                raise
            response = await unexpected_error(request, error)
            response.raw_headers.append(ALLOW_ORIGIN)
            await response(scope, receive, send)
