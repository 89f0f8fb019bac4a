"""A query leaves nothing for the cyclic garbage collector.

Every request's objects (the execution, its psycopg cursor and rows) must be freed when the
last reference goes: a reference cycle per request leaves them to the collector, whose full
passes grow with the pool (1,600 connections per worker) and took a quarter of a worker's
CPU time under load (issue 11)."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from grantkey.services.container import Services
from grantkey.services.sql import RunningQuery
from tests.conftest import Account, KeyHandle
from tests.support import apis_only

TRACKED = {"Execution", "RunningQuery", "StreamingCursor", "TimerHandle", "partial", "method"}


@pytest.fixture
def saved_garbage() -> Iterator[list[object]]:
    """What the collector finds while the test runs (kept, not freed, to be counted)."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def kinds(garbage: list[object]) -> dict[str, int]:
    found: dict[str, int] = {}
    for thing in garbage:
        name = type(thing).__name__
        if name in TRACKED:
            found[name] = found.get(name, 0) + 1
    return found


@pytest.mark.parametrize("closing", ["aclose", "async with"])
@pytest.mark.parametrize("query", ["SELECT g AS n FROM generate_series(1, 10) g",
                                   "SELECT 1 AS a; SELECT 2 AS b",
                                   "SELECT 1/0 AS broken"])
def test_a_query_leaves_no_cycle_behind(
    account: Account, services: Services, run: Callable[[Awaitable[Any]], Any],
    make_key: Callable[..., KeyHandle], saved_garbage: list[object], query: str,
    closing: str,
) -> None:
    key = make_key(account, "acyclic", apis_only("sql"))

    async def one() -> None:
        principal = await services.resolver.resolve(account.user, key.token, fresh=False)
        try:
            running: RunningQuery = await services.sql.start(principal, query)
        except Exception:  # the failing query: only its leftovers count
            return
        if closing == "async with":
            async with running:
                async for _ in running.rows():
                    pass
            return
        try:
            async for _ in running.rows():
                pass
        finally:
            await running.aclose()

    for _ in range(20):
        run(one())
    gc.collect()
    assert kinds(saved_garbage) == {}
