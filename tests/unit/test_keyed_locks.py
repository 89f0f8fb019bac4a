"""KeyedLocks: one queue per key, nothing kept once nobody holds or waits."""

from __future__ import annotations

import asyncio

from grantkey.services.keyed_locks import KeyedLocks


def test_one_holder_per_key_and_other_keys_go_on() -> None:
    async def scenario() -> list[str]:
        locks, seen = KeyedLocks(), []

        async def work(key: str, tag: str) -> None:
            async with locks.hold(key):
                seen.append(f"{tag}+")
                await asyncio.sleep(0.01)
                seen.append(f"{tag}-")

        await asyncio.gather(work("u1", "a"), work("u1", "b"), work("u2", "c"))
        assert len(locks) == 0
        return seen

    seen = asyncio.run(scenario())
    assert seen.index("a-") < seen.index("b+")  # one user's work, one at a time
    assert seen.index("c+") < seen.index("a-")  # another user's does not wait


def test_a_waiter_cancelled_or_failing_leaves_nothing_behind() -> None:
    async def scenario() -> int:
        locks = KeyedLocks()
        release = asyncio.Event()

        async def holder() -> None:
            async with locks.hold("u"):
                await release.wait()
                raise ValueError("the work failed")

        held = asyncio.ensure_future(holder())
        await asyncio.sleep(0)
        waiter = asyncio.ensure_future(locks.hold("u").__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
        release.set()
        await asyncio.gather(held, waiter, return_exceptions=True)
        return len(locks)

    assert asyncio.run(scenario()) == 0
