"""Per-role pools: bounded in total, the connection idle longest closed first, bounded wait,
reset."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from grantkey.db.role_pools import RolePools, RoleTarget
from grantkey.errors import PoolExhausted
from tests.conftest import Account, KeyHandle, Login
from tests.support import ServerProcess, apis_only


def target(account: Account, key: KeyHandle) -> RoleTarget:
    return RoleTarget(account.user.database, key.role, key.conninfo)


def backends(admin_url: str, roles: list[str]) -> dict[str, int]:
    with psycopg.connect(admin_url) as conn:
        rows = conn.execute("SELECT usename, count(*) FROM pg_stat_activity "
                            "WHERE usename = ANY(%s) GROUP BY 1", [roles]).fetchall()
    return {name: count for name, count in rows}


def test_cap_evicts_least_recently_used_idle_connections(
    account: Account, make_key: Callable[..., KeyHandle], run: Callable[[Awaitable[Any]], Any],
    admin_url: str,
) -> None:
    keys = [make_key(account, f"p{i}", apis_only("sql")) for i in range(3)]
    pools = RolePools(max_connections=2, wait_seconds=1, idle_seconds=60)

    async def scenario() -> None:
        for key in keys:  # each used once, released idle; the third evicts the first
            conn = await pools.acquire(target(account, key))
            await pools.release(target(account, key), conn, reusable=True)
        assert pools.open_connections == 2

    run(scenario())
    assert backends(admin_url, [k.role for k in keys]) == {keys[1].role: 1, keys[2].role: 1}
    run(pools.close())
    assert backends(admin_url, [k.role for k in keys]) == {}


def test_full_pool_waits_a_bounded_time_then_refuses(
    account: Account, make_key: Callable[..., KeyHandle], run: Callable[[Awaitable[Any]], Any],
) -> None:
    one, two = make_key(account, "a", apis_only("sql")), make_key(account, "b", apis_only("sql"))
    pools = RolePools(max_connections=1, wait_seconds=0.5, idle_seconds=60)

    async def scenario() -> float:
        held = await pools.acquire(target(account, one))
        started = time.monotonic()
        try:
            with pytest.raises(PoolExhausted, match="no database connection became free"):
                await pools.acquire(target(account, two))
            return time.monotonic() - started
        finally:
            await pools.release(target(account, one), held, reusable=True)
            await pools.close()

    assert run(scenario()) < 5


def test_a_waiting_request_gets_the_connection_released_meanwhile(
    account: Account, make_key: Callable[..., KeyHandle], run: Callable[[Awaitable[Any]], Any],
) -> None:
    key = make_key(account, "shared", apis_only("sql"))
    pools = RolePools(max_connections=1, wait_seconds=5, idle_seconds=60)

    async def scenario() -> None:
        held = await pools.acquire(target(account, key))

        async def later() -> None:
            await asyncio.sleep(0.2)
            await pools.release(target(account, key), held, reusable=True)

        releaser = asyncio.create_task(later())
        again = await pools.acquire(target(account, key))
        assert again is held  # reused after ROLLBACK + DISCARD ALL
        await releaser
        await pools.release(target(account, key), again, reusable=True)
        await pools.close()

    run(scenario())


def test_idle_connections_are_closed_after_a_while(
    account: Account, make_key: Callable[..., KeyHandle], run: Callable[[Awaitable[Any]], Any],
) -> None:
    key = make_key(account, "idle", apis_only("sql"))
    pools = RolePools(max_connections=4, wait_seconds=1, idle_seconds=60)

    async def scenario() -> None:
        conn = await pools.acquire(target(account, key))
        await pools.release(target(account, key), conn, reusable=True)
        assert await pools.close_idle(older_than=60) == 0
        assert await pools.close_idle(older_than=0) == 1
        assert pools.open_connections == 0 and conn.closed

    run(scenario())


@pytest.fixture(scope="module")
def tiny_server(data_dir: Path, login: Login, server: ServerProcess) -> Iterator[ServerProcess]:
    process = ServerProcess(
        login.args(data_dir), data_dir / "tiny.log",
        {**login.env, "GRANTKEY_SQL_MAX_CONNECTIONS": "1",
         "GRANTKEY_SQL_POOL_WAIT": "1", "GRANTKEY_SQL_TIMEOUT": "10"})
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


def test_sql_api_answers_429_when_no_connection_frees_up(
    account: Account, make_key: Callable[..., KeyHandle], tiny_server: ServerProcess,
) -> None:
    busy, other = make_key(account, "busy", apis_only("sql")), make_key(account, "other",
                                                                         apis_only("sql"))
    url = f"{tiny_server.url}/user/{account.username}/api/v2/sql"
    with httpx.Client(timeout=30) as slow_client:
        slow = threading.Thread(target=lambda: slow_client.get(
            url, params={"q": "SELECT pg_sleep(4)", "api_key": busy.token}))
        slow.start()
        time.sleep(0.5)
        started = time.monotonic()
        response = httpx.get(url, params={"q": "SELECT 1", "api_key": other.token}, timeout=30)
        assert response.status_code == 429
        assert "no database connection became free" in response.json()["error"][0]
        assert time.monotonic() - started < 4
        slow.join()
    after = httpx.get(url, params={"q": "SELECT 1 AS x", "api_key": other.token}, timeout=30)
    assert after.status_code == 200


def test_clients_that_disconnect_mid_query_do_not_leak_connections(
    account: Account, make_key: Callable[..., KeyHandle], tiny_server: ServerProcess,
) -> None:
    """The pool holds one connection: a single leaked slot would make every later call 429."""
    key = make_key(account, "quitter", apis_only("sql"))
    url = f"{tiny_server.url}/user/{account.username}/api/v2/sql"
    for _ in range(3):  # gone while the query runs
        with pytest.raises(httpx.TimeoutException):
            httpx.get(url, params={"q": "SELECT pg_sleep(1)", "api_key": key.token}, timeout=0.3)
        time.sleep(1.2)
    for _ in range(3):  # gone while the answer streams
        with httpx.stream("GET", url, params={
            "q": "SELECT g, repeat('x', 200) FROM generate_series(1, 200000) g",
            "api_key": key.token}, timeout=30) as response:
            assert response.status_code == 200
            next(response.iter_bytes())
    time.sleep(0.5)
    for _ in range(5):
        after = httpx.get(url, params={"q": "SELECT 1 AS x", "api_key": key.token}, timeout=30)
        assert after.status_code == 200, after.text


def test_waiting_requests_are_served_first_come_first_served(
    account: Account, make_key: Callable[..., KeyHandle], run: Callable[[Awaitable[Any]], Any],
) -> None:
    key = make_key(account, "fifo", apis_only("sql"))
    pools = RolePools(max_connections=1, wait_seconds=5, idle_seconds=60)
    served: list[int] = []

    async def one(number: int) -> None:
        conn = await pools.acquire(target(account, key))
        served.append(number)
        await asyncio.sleep(0.01)
        await pools.release(target(account, key), conn, reusable=True)

    async def scenario() -> None:
        held = await pools.acquire(target(account, key))
        waiting = []
        for number in range(5):
            waiting.append(asyncio.create_task(one(number)))
            await asyncio.sleep(0.01)  # each one queues behind the previous
        await pools.release(target(account, key), held, reusable=True)
        await asyncio.gather(*waiting)
        assert pools.open_connections == 1
        await pools.close()

    run(scenario())
    assert served == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("quits", ["before the release", "just after the hand-over"])
def test_a_waiter_that_gives_up_does_not_take_the_connection_with_it(
    account: Account, make_key: Callable[..., KeyHandle], run: Callable[[Awaitable[Any]], Any],
    quits: str,
) -> None:
    key = make_key(account, "quit", apis_only("sql"))
    pools = RolePools(max_connections=1, wait_seconds=5, idle_seconds=60)

    async def scenario() -> None:
        held = await pools.acquire(target(account, key))
        quitter = asyncio.create_task(pools.acquire(target(account, key)))
        patient = asyncio.create_task(pools.acquire(target(account, key)))
        await asyncio.sleep(0.05)
        if quits == "before the release":
            quitter.cancel()  # the client went away while waiting
            await pools.release(target(account, key), held, reusable=True)
        else:  # handed the connection, cancelled before it could run again
            await pools.release(target(account, key), held, reusable=True)
            quitter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await quitter
        conn = await asyncio.wait_for(patient, 5)
        assert conn is held and pools.open_connections == 1
        await pools.release(target(account, key), conn, reusable=True)
        await pools.close()

    run(scenario())


def test_a_full_pool_closes_the_connection_idle_longest_whatever_its_key(
    account: Account, make_key: Callable[..., KeyHandle], run: Callable[[Awaitable[Any]], Any],
    admin_url: str,
) -> None:
    """Eviction by idle time, not by key: a key in steady use keeps its connections (a
    popular key's spares are taken back within moments under Zipf-like traffic; closing
    them made it pay logins over and over), and a spare nobody took back for a while is the
    first to go, since a key's newest idle connection is the one taken next."""
    quiet, burst, newcomer, late = (make_key(account, name, apis_only("sql"))
                                    for name in ("quiet", "burst", "newcomer", "late"))
    pools = RolePools(max_connections=3, wait_seconds=1, idle_seconds=60)
    roles = [quiet.role, burst.role, newcomer.role, late.role]

    async def use(key: KeyHandle, times: int = 1) -> None:
        held = [await pools.acquire(target(account, key)) for _ in range(times)]
        for conn in held:
            await pools.release(target(account, key), conn, reusable=True)
            await asyncio.sleep(0.01)  # distinct idle times

    async def first() -> None:
        await use(quiet)
        await use(burst, 2)
        await use(newcomer)  # full: quiet's, idle longest, goes; burst keeps both

    run(first())
    assert backends(admin_url, roles) == {burst.role: 2, newcomer.role: 1}

    async def second() -> None:
        await use(burst)  # takes its newest idle connection back: the other one ages
        await use(newcomer)
        await use(late)  # full: burst's untouched spare goes, not newcomer's only one

    run(second())
    assert backends(admin_url, roles) == {burst.role: 1, newcomer.role: 1, late.role: 1}
    run(pools.close())
