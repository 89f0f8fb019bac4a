"""Fair shares of the key-role connections: one key (role) holds at most `key_limit`
connections at once, one user (database) at most `user_limit`; a request over its share
waits without holding up the requests behind it that are within theirs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from grantkey.db.role_pools import RoleConnection, RolePools, RoleTarget
from grantkey.errors import PoolExhausted, SetupError
from grantkey.settings import Settings
from tests.conftest import Account, KeyHandle
from tests.support import apis_only


def target(account: Account, key: KeyHandle) -> RoleTarget:
    return RoleTarget(account.user.database, key.role, key.conninfo)


def test_one_key_holds_at_most_its_share_and_others_still_get_connections(
    account: Account, make_account: Callable[[], Account], make_key: Callable[..., KeyHandle],
    run: Callable[[Awaitable[Any]], Any],
) -> None:
    flood, other = make_key(account, "flood", apis_only("sql")), make_key(account, "other",
                                                                           apis_only("sql"))
    neighbour = make_account()
    neighbour_key = make_key(neighbour, "n", apis_only("sql"))
    pools = RolePools(max_connections=4, wait_seconds=0.5, idle_seconds=60, key_share=0.5,
                      user_share=0.75)
    assert (pools.key_limit, pools.user_limit) == (2, 3)

    async def scenario() -> None:
        held: list[tuple[RoleTarget, RoleConnection]] = []
        for _ in range(2):
            held.append((target(account, flood), await pools.acquire(target(account, flood))))
        with pytest.raises(PoolExhausted):  # a third for the same key waits, then 429
            await pools.acquire(target(account, flood))
        assert pools.held(account.user.database, flood.role) == 2
        held.append((target(account, other), await pools.acquire(target(account, other))))
        with pytest.raises(PoolExhausted):  # the user is at 3 of 4
            await pools.acquire(target(account, other))
        held.append((target(neighbour, neighbour_key),
                     await pools.acquire(target(neighbour, neighbour_key))))
        assert pools.held(account.user.database) == 3
        for where, conn in held:
            await pools.release(where, conn, reusable=True)
        assert pools.held(account.user.database) == 0
        await pools.close()

    run(scenario())


def test_a_waiter_over_its_share_does_not_hold_up_the_line(
    account: Account, make_key: Callable[..., KeyHandle], run: Callable[[Awaitable[Any]], Any],
) -> None:
    flood, other = make_key(account, "flood2", apis_only("sql")), make_key(account, "other2",
                                                                            apis_only("sql"))
    pools = RolePools(max_connections=2, wait_seconds=2, idle_seconds=60, key_share=0.5)

    async def scenario() -> None:
        first = await pools.acquire(target(account, flood))
        queued = asyncio.create_task(pools.acquire(target(account, flood)))  # over its share
        await asyncio.sleep(0.1)
        # a newcomer within its share goes at once, past the waiter ahead of it
        mine = await asyncio.wait_for(pools.acquire(target(account, other)), 0.5)
        await pools.release(target(account, other), mine, reusable=True)
        assert not queued.done()
        await pools.release(target(account, flood), first, reusable=True)
        second = await asyncio.wait_for(queued, 1)  # its own key's slot came free
        await pools.release(target(account, flood), second, reusable=True)
        assert pools.held(account.user.database) == 0
        await pools.close()

    run(scenario())


def test_a_cancelled_or_failed_acquire_gives_its_share_back(
    account: Account, make_key: Callable[..., KeyHandle], run: Callable[[Awaitable[Any]], Any],
) -> None:
    key = make_key(account, "k3", apis_only("sql"))
    pools = RolePools(max_connections=2, wait_seconds=5, idle_seconds=60, key_share=0.5)

    async def scenario() -> None:
        held = await pools.acquire(target(account, key))
        waiting = asyncio.create_task(pools.acquire(target(account, key)))
        await asyncio.sleep(0.1)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await pools.release(target(account, key), held, reusable=True)
        assert pools.held(account.user.database, key.role) == 0
        bad = RoleTarget(account.user.database, key.role, key.conninfo + " password=wrong")
        with contextlib.suppress(Exception):
            await pools.acquire(bad)
        assert pools.held(account.user.database, key.role) == 0
        await pools.close()

    run(scenario())


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "half"])
def test_a_share_setting_outside_0_to_1_stops_the_start(value: str) -> None:
    with pytest.raises(SetupError, match="GRANTKEY_SQL_KEY_SHARE"):
        Settings.from_env({"GRANTKEY_SQL_KEY_SHARE": value})
