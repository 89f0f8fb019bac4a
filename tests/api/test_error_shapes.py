"""A bug in a handler answers its API family's own 500 (the Auth API's shape on the Auth
API: it used to get the SQL API's), logged with its traceback and never shown. In process:
grantkey's endpoint wrapper over the real PostgreSQL, the credential resolved for real."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from grantkey.http.context import Call, endpoint
from grantkey.http.errors import Family
from grantkey.http.routing import for_every_user
from grantkey.services.container import Services
from tests.conftest import Account

SECRET = "bug detail: /var/lib/secret.sock"


async def broken(call: Call) -> Any:
    raise RuntimeError(SECRET)


@pytest.mark.parametrize(("family", "expected"), [
    (Family.AUTH, {"errors": "Internal error", "errors_cause": None}),
    (Family.V4, {"errors": "Internal error", "errors_cause": None}),
    (Family.DATA, {"error": ["Internal error"]}),
], ids=lambda v: v.value if isinstance(v, Family) else "")
def test_a_bug_in_a_handler_answers_the_familys_500_and_logs_it(
    services: Services, run: Callable[[Awaitable[Any]], Any], account: Account,
    caplog: pytest.LogCaptureFixture, family: Family, expected: dict[str, Any],
) -> None:
    app = Starlette(routes=for_every_user([Route("/api/test/broken", endpoint(family, broken))]))
    app.state.services = services

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get(f"/user/{account.username}/api/test/broken",
                                    params={"api_key": account.master_token})

    with caplog.at_level(logging.ERROR, logger="grantkey.http"):
        response = run(call())
    assert response.status_code == 500
    assert response.json() == expected
    assert SECRET not in response.text
    assert any(record.exc_info and SECRET in str(record.exc_info[1]) for record in caplog.records)
