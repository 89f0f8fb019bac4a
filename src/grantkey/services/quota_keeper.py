"""Keeps each user database with a storage quota swept while it is used.

`storage_quota.sweep` gives the quota's trigger to tables made where no event trigger fires
and, over the limit, withholds CREATE on the database's schemas (so no more such tables can
be made). It runs after each request of a user with a quota, and every `period` seconds
while any of that user's requests runs: a request that crosses the limit and then loops
`EXPLAIN ANALYZE CREATE TABLE … AS` is stopped within a period, not at its end. One sweeper
per database at a time; sweeps that fail are logged by `sweep` and made again next time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from grantkey.db import storage_quota
from grantkey.db.cluster import Cluster

PERIOD_SECONDS = 1.0


class QuotaKeeper:
    def __init__(self, cluster: Cluster, period: float = PERIOD_SECONDS) -> None:
        self.cluster = cluster
        self.period = period
        self._running: Counter[str] = Counter()  # requests running, per database
        self._wake: dict[str, asyncio.Event] = {}  # a request ended: sweep now
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def enter(self, database: str) -> None:
        """A request of a user with a quota starts in `database`."""
        self._running[database] += 1
        self._sweeper(database)

    def leave(self, database: str) -> None:
        """It ended (however): sweep after it."""
        self._running[database] -= 1
        if self._running[database] <= 0:
            del self._running[database]
        self._sweeper(database).set()

    def _sweeper(self, database: str) -> asyncio.Event:
        wake = self._wake.get(database)
        if wake is None:
            wake = self._wake[database] = asyncio.Event()
            self._tasks[database] = asyncio.get_running_loop().create_task(
                self._sweep(database, wake))
        return wake

    async def _sweep(self, database: str, wake: asyncio.Event) -> None:
        try:
            while True:
                if not wake.is_set():
                    if not self._running[database]:
                        return
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), self.period)
                wake.clear()
                await storage_quota.sweep(self.cluster, database)
        finally:  # (in the same step as the last check: a request entering later starts anew)
            del self._wake[database]
            del self._tasks[database]

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
