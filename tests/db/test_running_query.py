"""The SQL service's running query owns its connection (`aclose()`, `async with`), and a
query can carry bind parameters (PostgreSQL's `$1`, `$2`…), as the key's own role."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from grantkey.errors import SqlError
from grantkey.services.container import Services
from grantkey.services.sql import Page, RunningQuery, composed_query
from tests.conftest import Account, KeyHandle
from tests.support import apis_only


async def _all_rows(running: RunningQuery) -> list[tuple[Any, ...]]:
    async with running:
        return [row async for row in running.rows()]


@pytest.fixture
def start(account: Account, services: Services, make_key: Callable[..., KeyHandle],
          ) -> Callable[..., Awaitable[RunningQuery]]:
    key = make_key(account, "running", apis_only("sql"))

    async def started(query: str, **options: Any) -> RunningQuery:
        principal = await services.resolver.resolve(account.user, key.token, fresh=False)
        return await services.sql.start(principal, query, **options)

    return started


def test_bind_parameters_are_sent_apart_from_the_text(
    start: Callable[..., Awaitable[RunningQuery]], run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def scenario() -> list[tuple[Any, ...]]:
        running = await start("SELECT $1::int + 1 AS n, $2::text AS t, current_user = session_user"
                              " AS own_role", params=[41, "it's; a text"])
        return await _all_rows(running)

    assert run(scenario()) == [(42, "it's; a text", True)]


def test_the_text_is_never_scanned_for_psycopg_placeholders(
    start: Callable[..., Awaitable[RunningQuery]], run: Callable[[Awaitable[Any]], Any],
) -> None:
    """`%s` is text to PostgreSQL, with parameters or without: only `$n` binds."""
    async def scenario() -> list[list[tuple[Any, ...]]]:
        query = "SELECT s FROM (VALUES ('a%s'), ('b%')) v(s) WHERE s LIKE 'a%' || $1"
        with_params = await _all_rows(await start(query, params=["s"]))
        without = await _all_rows(await start("SELECT '%s %% %(x)s' AS s"))
        return [with_params, without]

    assert run(scenario()) == [[("a%s",)], [("%s %% %(x)s",)]]


def test_many_rows_with_parameters_are_streamed_in_batches(
    start: Callable[..., Awaitable[RunningQuery]], run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def scenario() -> tuple[bool, int]:
        running = await start("SELECT g FROM generate_series(1, $1) g", params=[5000])
        complete = running.complete
        return complete, len(await _all_rows(running))

    assert run(scenario()) == (False, 5000)


def test_several_statements_with_parameters_are_refused_clearly_and_nothing_runs(
    account: Account, services: Services, start: Callable[..., Awaitable[RunningQuery]],
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    with pytest.raises(SqlError) as refused:
        run(start("CREATE TABLE ran_anyway (a int); SELECT $1::int AS a", params=[1]))
    assert refused.value.status == 400
    assert "bind parameters must be a single statement" in str(refused.value)
    assert run(_all_rows(run(start("SELECT to_regclass('ran_anyway') AS t")))) == [(None,)]
    assert services.pools.held(account.user.database) == 0
    # without parameters, several statements still run (the simple protocol, CARTO's rule)
    assert run(_all_rows(run(start("SELECT 1 AS a; SELECT 2 AS b")))) == [(2,)]


def test_a_wrong_number_of_parameters_is_postgresqls_own_400(
    start: Callable[..., Awaitable[RunningQuery]], run: Callable[[Awaitable[Any]], Any],
) -> None:
    with pytest.raises(SqlError) as wrong:
        run(start("SELECT $1::int AS a, $2::int AS b", params=[1]))
    assert wrong.value.status == 400


def test_aclose_gives_the_connection_back_once(
    account: Account, services: Services, start: Callable[..., Awaitable[RunningQuery]],
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def scenario() -> list[int]:
        held = []
        running = await start("SELECT g FROM generate_series(1, 10000) g")
        held.append(services.pools.held(account.user.database))
        await running.aclose()  # unread rows: the query is stopped, the session not reused
        await running.aclose()
        async with running:
            pass
        held.append(services.pools.held(account.user.database))
        return held

    assert run(scenario()) == [1, 0]


def test_a_reader_cancelled_mid_query_still_gives_the_connection_back(
    account: Account, services: Services, start: Callable[..., Awaitable[RunningQuery]],
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    async def scenario() -> int:
        running = await start("SELECT g, pg_sleep(0.0005) FROM generate_series(1, 20000) g")

        async def read() -> None:
            async with running:
                async for _ in running.rows():
                    await asyncio.sleep(0)

        reader = asyncio.ensure_future(read())
        await asyncio.sleep(0.1)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        return services.pools.held(account.user.database)

    assert run(scenario()) == 0


def test_the_service_composes_paging_and_geojson() -> None:
    query = "SELECT * FROM t;"
    assert composed_query(query) == query  # as it came, byte for byte
    assert composed_query(query, page=Page(10, 2)) == (
        "SELECT * FROM (SELECT * FROM t\n) AS cdbq LIMIT 10 OFFSET 20")  # own line: a -- ends
    assert composed_query("INSERT INTO t VALUES (1)", page=Page(10, 2)) == (
        "INSERT INTO t VALUES (1)")  # only a SELECT (or WITH) is paged
    assert '"__grantkey_geojson"' in composed_query(query, geojson_digits=3)
    assert "ST_AsGeoJSON(the_geom, 3)" in composed_query(query, geojson_digits=3)
