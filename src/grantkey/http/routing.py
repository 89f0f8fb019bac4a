"""Where the APIs are served: one route list, mounted under every user prefix.

A request names its user in the path (`/user/<u>/…`, `/u/<u>/…`) or, with no prefix, by
the first label of its Host header (the host form). The APIs write their routes once,
without a prefix and without a trailing slash; `for_every_user` serves that one list in
the host form and mounts it under each path prefix, collections with and without a
trailing slash. The OpenAPI document shows each operation once, under `CANONICAL_PREFIX`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import Scope

USER_PREFIXES = ("/user/{username}", "/u/{username}")
CANONICAL_PREFIX = USER_PREFIXES[0]
HOST_FORM = ""  # no prefix: the user comes from the Host header
# routes whose request body streams for as long as it takes (copyfrom): the protocol gives
# their body no whole-body deadline
UPLOAD_PATHS = tuple(f"/api/{version}/sql/copyfrom" for version in ("v2", "v1"))


class FastRoute(Route):
    """A hot route: its GET and POST requests are answered before Starlette's middleware
    and router (`fast_path.FastTable`, built from the served routes), so its handler must
    render its own errors (`context.endpoint`). Starlette serves it as any route otherwise
    (HEAD, OPTIONS…)."""


def is_upload(path: str) -> bool:
    """Is this request path (under any user prefix, or none) an upload route's?"""
    return path.rstrip("/").endswith(UPLOAD_PATHS)


def slash_variants(path: str) -> list[str]:
    """A collection path (one not ending in a parameter) also answers with a trailing slash."""
    return [path] if path.endswith("}") else [path, path + "/"]


class UserPrefix(Mount):
    """A user prefix mounted over the API routes. Unlike a plain `Mount`, it claims a path
    only when one of its routes does (fully, or by path with another method): a path under
    the prefix that no route serves stays the app's own 404 or trailing-slash redirect, as
    when every route was registered with the prefix written out."""

    def __init__(self, path: str, routes: Sequence[BaseRoute]) -> None:
        super().__init__(path, routes=routes)
        # the mount's remainder is `.*`, which stops at a line break; a route's own
        # `[^/]+` does not: a name holding one must still reach its handler
        self.path_regex = re.compile(self.path_regex.pattern, re.DOTALL)

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is Match.NONE:
            return match, child
        inner = {**scope, **child}
        found = Match.NONE
        for route in self.routes:
            route_match, _ = route.matches(inner)
            if route_match is Match.FULL:
                return Match.FULL, child
            if route_match is Match.PARTIAL:
                found = Match.PARTIAL
        return found, child


def for_every_user(routes: Sequence[Route]) -> list[BaseRoute]:
    """The APIs' routes in the host form and under each user prefix."""
    variants: list[BaseRoute] = []
    for route in routes:
        for path in slash_variants(route.path):
            variants.append(route if path == route.path else
                            type(route)(path, route.endpoint, methods=route.methods))
    return [*variants, *(UserPrefix(prefix, routes=variants) for prefix in USER_PREFIXES)]


def served_routes(routes: Sequence[BaseRoute], prefix: str = "") -> Iterator[tuple[str, Route]]:
    """Every route with the whole path it answers (mount prefixes joined), in order."""
    for route in routes:
        if isinstance(route, Mount):
            yield from served_routes(route.routes, prefix + route.path)
        elif isinstance(route, Route):
            yield prefix + route.path, route
