"""A process's leases on roomy buckets (`services/rate_leases.py`): requests served from a
lease never take the limit past what the shared table allows, across processes; near the
limit every request is the table's exact decision; the headers count down as without
leases; a lease ends after LEASE_SECONDS."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from pathlib import Path

from grantkey.domain.rate_limits import Decision, Rate
from grantkey.services.rate_leases import LEASE_SECONDS, MAX_LEASE, LeasedBuckets
from grantkey.services.rate_store import SharedBuckets, Takes


class CountingStore:
    """The shared table, counting the requests that reach it."""

    def __init__(self, path: Path) -> None:
        self.table = SharedBuckets(path)
        self.calls = 0

    async def take(self, takes: Takes) -> list[Decision]:
        self.calls += 1
        return await self.table.take(takes)

    async def close(self) -> None:
        await self.table.close()


def _hammer(path: str, rate: Rate, attempts: int, results: multiprocessing.Queue[int]) -> None:
    async def run() -> int:
        buckets = LeasedBuckets(SharedBuckets(Path(path)))
        admitted = 0
        for _ in range(attempts):
            (decision,) = await buckets.take([(b"k:shared", rate)])
            admitted += decision.allowed
        return admitted

    results.put(asyncio.run(run()))


def test_processes_leasing_one_bucket_never_admit_more_than_its_limit(tmp_path: Path) -> None:
    rate = Rate(1, 3600, 1999)  # 2,000 at once, then one an hour
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[int] = context.Queue()
    workers = [context.Process(target=_hammer, args=(str(tmp_path / "b.bin"), rate, 1000,
                                                     results)) for _ in range(3)]
    for worker in workers:
        worker.start()
    admitted = sum(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(30)
    assert admitted <= 2000
    # what leases still held when a process stopped was lost, never more
    assert admitted >= 2000 - 3 * MAX_LEASE, admitted


def test_a_roomy_buckets_requests_mostly_skip_the_table_and_count_down_exactly(
        tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "b.bin")
    buckets = LeasedBuckets(store)
    rate = Rate(1, 3600, 9999)  # no refill to speak of within the test

    async def run() -> list[int]:
        remaining = []
        for _ in range(1000):
            (decision,) = await buckets.take([(b"k:roomy", rate)])
            assert decision.allowed
            remaining.append(decision.remaining)
        return remaining

    assert asyncio.run(run()) == list(range(9999, 8999, -1))
    assert store.calls <= 1000 // (MAX_LEASE // 2), store.calls


def test_near_its_limit_every_request_asks_the_table(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "b.bin")
    buckets = LeasedBuckets(store)
    rate = Rate(1, 3600, 49)  # 50 at once: under 64 of room, no request leases

    async def run() -> list[bool]:
        return [(await buckets.take([(b"k:tight", rate)]))[0].allowed for _ in range(60)]

    assert asyncio.run(run()) == [True] * 50 + [False] * 10
    assert store.calls == 60


def test_a_lease_ends_after_its_time_and_what_it_held_is_not_spent(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "b.bin")
    buckets = LeasedBuckets(store)
    rate = Rate(1, 3600, 9999)

    async def run() -> None:
        for _ in range(3):  # the second request leases
            await buckets.take([(b"k:roomy", rate)])
        before = store.calls
        await asyncio.sleep(LEASE_SECONDS * 1.5)
        await buckets.take([(b"k:roomy", rate)])
        assert store.calls == before + 1  # the lease had permits left, but ended

    asyncio.run(run())


def test_a_refusal_by_one_bucket_spends_no_lease_of_the_other(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "b.bin")
    buckets = LeasedBuckets(store)
    roomy, strict = Rate(1, 3600, 9999), Rate(1, 3600, 1)

    async def run() -> list[list[bool]]:
        for _ in range(3):
            await buckets.take([(b"k:roomy", roomy)])  # leased now
        return [[d.allowed for d in await buckets.take([(b"k:roomy", roomy),
                                                        (b"u:strict", strict)])]
                for _ in range(3)]

    assert asyncio.run(run()) == [[True, True], [True, True], [True, False]]
    table = SharedBuckets(tmp_path / "b.bin")
    # the table counted the leases taken (never the refused request), no more
    assert table.take_now(b"k:roomy", roomy, time.time() - 1_735_689_600.0).remaining >= (
        9999 - 3 - 2 * MAX_LEASE)
