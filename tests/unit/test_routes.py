"""One route list serves every user prefix (routing.for_every_user): each form of a path
reaches the same endpoint with the same path parameters, and a path under a prefix that
no route serves answers as it did when every prefix was written out (404, or the router's
trailing-slash redirect), never claimed by the mount. In process, no PostgreSQL: the
router's choice is read from the ASGI scope."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.types import Message

from grantkey.http.app import create_app
from grantkey.http.fast_path import GrantkeyApp
from grantkey.settings import Settings


class NoServices:
    """Any use of the services fails: the handler answers its family's 500."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"no services in this test ({name})")


@pytest.fixture(scope="module")
def app() -> GrantkeyApp:
    built = create_app(Settings(database_url="dbname=unused", secret="s" * 40))
    built.state.services = NoServices()
    return built


def call(app: GrantkeyApp, method: str, path: str) -> tuple[int, dict[str, str], Any, Any]:
    """(status, headers, endpoint, path params) of one request through the whole app."""
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"host", b"alice.example.com")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(message for message in sent if message["type"] == "http.response.start")
    headers = {key.decode(): value.decode() for key, value in start["headers"]}
    return start["status"], headers, scope.get("endpoint"), scope.get("path_params")


CANONICAL = [("GET", "/user/alice/api/v3/api_keys"), ("POST", "/user/alice/api/v3/api_keys"),
             ("GET", "/user/alice/api/v3/api_keys/k%20"),
             ("DELETE", "/user/alice/api/v3/api_keys/k"),
             ("POST", "/user/alice/api/v3/api_keys/k/token/regenerate"),
             ("GET", "/user/alice/api/v4/datasets"), ("PATCH", "/user/alice/api/v4/datasets/t"),
             ("HEAD", "/user/alice/api/v2/sql"), ("HEAD", "/user/alice/api/v1/sql")]


def forms(path: str) -> list[str]:
    tail = path.removeprefix("/user/alice")
    found = ["/u/alice" + tail, tail]
    if not tail.endswith(("/k", "/t", "%20")):
        found += [form + "/" for form in [path, *found]]
    return found


@pytest.mark.parametrize(("method", "path"), CANONICAL)
def test_every_form_reaches_the_canonical_paths_endpoint(
    app: GrantkeyApp, method: str, path: str,
) -> None:
    status, _, endpoint, params = call(app, method, path)
    assert status == 500 and endpoint is not None  # reached the handler (no services here)
    for form in forms(path):
        form_status, _, form_endpoint, form_params = call(app, method, form)
        assert (form_status, form_endpoint) == (status, endpoint), form
        expected = dict(params) if form.startswith("/u") else {
            k: v for k, v in params.items() if k != "username"}
        assert form_params == expected, form


@pytest.mark.parametrize("prefix", ["/user/alice", "/u/alice", ""])
def test_a_path_no_route_serves_is_not_claimed_by_a_prefix(app: GrantkeyApp,
                                                           prefix: str) -> None:
    assert call(app, "GET", prefix + "/api/v3/nothing")[0] == 404
    assert call(app, "GET", prefix + "/")[0] == 404
    if prefix:
        assert call(app, "GET", prefix)[0] == 404  # not redirected to "<prefix>/"
    status, headers, _, _ = call(app, "GET", prefix + "/api/v3/api_keys/k/")
    assert (status, headers["location"]) == (307, f"http://alice.example.com{prefix}"
                                                   "/api/v3/api_keys/k")


@pytest.mark.parametrize("prefix", ["/user/alice", "/u/alice", ""])
def test_a_wrong_method_answers_405_with_the_first_routes_methods(app: GrantkeyApp,
                                                                   prefix: str) -> None:
    status, headers, _, _ = call(app, "PUT", prefix + "/api/v3/api_keys/k")
    assert status == 405 and set(headers["allow"].split(", ")) == {"GET", "HEAD"}
    status, headers, _, _ = call(app, "GET", prefix + "/api/v4/datasets/t")
    assert status == 405 and headers["allow"] == "PATCH"


@pytest.mark.parametrize("prefix", ["/user/alice", "/u/alice", ""])
def test_a_name_holding_a_line_break_reaches_its_handler(app: GrantkeyApp, prefix: str) -> None:
    """A mount's remainder pattern stops at a line break where a route's `[^/]+` does not
    (found by the OpenAPI fuzzer: a dataset name with "\n" got the router's 404)."""
    for method, tail in (("GET", "/api/v3/api_keys/k\nx"), ("PATCH", "/api/v4/datasets/t\n")):
        status, _, endpoint, params = call(app, method, prefix + tail)
        assert status == 500 and endpoint is not None, (method, prefix + tail)
        assert params["name"] == tail.rsplit("/", 1)[1]
