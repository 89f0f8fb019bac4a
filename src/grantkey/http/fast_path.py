"""The hot routes' fast path: their requests go straight to the handler.

Starlette would take each one through its error and CORS middleware, its exception
middleware and a walk over every route's pattern. A hot route (`routing.FastRoute`: the SQL
API's, tiles later) renders its own errors already (`context.endpoint`), so for its GET
and POST the app does the remaining two jobs itself: the CORS header, and a 500 for an
unexpected exception before the answer started. Which paths those are is not written
here: `FastTable` is built from the routes the app serves (each hot route under every user
prefix, in the host form, with and without a trailing slash), as one pattern. Every other
request (and HEAD, OPTIONS or any other method on these paths) goes through Starlette as
before; the hot routes stay registered there too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.convertors import CONVERTOR_TYPES, Convertor
from starlette.requests import Request
from starlette.routing import PARAM_REGEX, BaseRoute
from starlette.types import Message, Receive, Scope, Send

from grantkey.http.context import RequestHandler
from grantkey.http.cors import ALLOW_ORIGIN, with_cors_headers
from grantkey.http.errors import unexpected_error
from grantkey.http.routing import FastRoute, served_routes

FAST_METHODS = frozenset({"GET", "POST"})
Params = tuple[tuple[str, str, Convertor[Any] | None], ...]


@dataclass(frozen=True)
class FastEntry:
    """One served form of a hot route: its handler, methods, and path parameters (name,
    the pattern's group holding it, its convertor; None for a plain string)."""

    path: str
    handler: RequestHandler
    methods: frozenset[str]
    params: Params


class _Node:
    """A node of the trie of the hot paths: one literal character or parameter a level."""

    def __init__(self, group: str | None = None) -> None:
        self.group = group  # a parameter's node: the pattern's group for it
        self.children: dict[str | tuple[str, str], _Node] = {}
        self.end: str | None = None  # a whole path ends here: its entry's name


def _tokens(path: str) -> list[str | tuple[str, str]]:
    """A path in Starlette's syntax as characters and (parameter, convertor) pairs."""
    tokens: list[str | tuple[str, str]] = []
    end = 0
    for found in PARAM_REGEX.finditer(path):
        tokens += list(path[end:found.start()])
        tokens.append((found.group(1), (found.group(2) or ":str")[1:]))
        end = found.end()
    return tokens + list(path[end:])


def _regex(node: _Node) -> str:
    branches = []
    for token, child in node.children.items():
        if isinstance(token, str):
            head = re.escape(token)
        else:
            head = f"(?P<{child.group}>{CONVERTOR_TYPES[token[1]].regex})"
        branches.append(head + _regex(child))
    if node.end is not None:
        branches.append(f"(?P<{node.end}>)")  # closes last: the match's `lastgroup`
    return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"


class FastTable:
    """The hot routes among `routes` (mounts walked), matched by one pattern: the trie of
    their paths, so that the forms sharing a prefix share its matching."""

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        self.entries: dict[str, FastEntry] = {}
        root, groups = _Node(), 0
        for path, route in served_routes(routes):
            methods = FAST_METHODS & (route.methods or set())
            if not isinstance(route, FastRoute) or not methods:
                continue
            name = f"r{len(self.entries)}"
            node, params = root, []
            for token in _tokens(path):
                child = node.children.get(token)
                if child is None:
                    group = None if isinstance(token, str) else f"p{groups}"
                    groups += 0 if group is None else 1
                    child = node.children[token] = _Node(group)
                if not isinstance(token, str) and child.group is not None:
                    convertor = CONVERTOR_TYPES[token[1]]
                    params.append((token[0], child.group,
                                   None if token[1] == "str" else convertor))
                node = child
            if node.end is None:  # two routes on one path: the first one serves it
                node.end = name
                self.entries[name] = FastEntry(path, route.endpoint, frozenset(methods),
                                               tuple(params))
        self.methods = frozenset().union(*(entry.methods for entry in self.entries.values()))
        self.pattern = re.compile(_regex(root)) if self.entries else None

    def match(self, method: str, path: str) -> tuple[RequestHandler, dict[str, Any]] | None:
        """The handler and path parameters of a hot route's request, else None."""
        if self.pattern is None or method not in self.methods:
            return None
        found = self.pattern.fullmatch(path)
        if found is None:
            return None
        entry = self.entries[found.lastgroup or ""]
        if method not in entry.methods:
            return None
        return entry.handler, {param: found[group] if convertor is None
                               else convertor.convert(found[group])
                               for param, group, convertor in entry.params}


class GrantkeyApp(Starlette):
    """Starlette, with the hot routes' requests dispatched before the middleware stack.
    The table is built from the routes given to the constructor."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fast = FastTable(self.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = None
        if scope["type"] == "http" and not scope.get("root_path"):
            found = self.fast.match(scope["method"], scope["path"])
        if found is None:
            await super().__call__(scope, receive, send)
            return
        handler, scope["path_params"] = found
        scope["app"] = self
        await self._serve_fast(handler, scope, receive, send)

    async def _serve_fast(self, handler: RequestHandler, scope: Scope, receive: Receive,
                          send: Send) -> None:
        request = Request(scope, receive)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            response = await handler(request)
            with_cors_headers(response.raw_headers)
            await response(scope, receive, tracked)
        except Exception as error:
            if started:  # the status line is gone: nothing better than ending the answer
                raise
            response = await unexpected_error(request, error)
            response.raw_headers.append(ALLOW_ORIGIN)
            await response(scope, receive, send)
