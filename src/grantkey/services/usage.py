"""Who used which key, counted in memory on each request (a dictionary increment) and
written to the user's database at most once a minute per process (`db.usage`): requests
per key, day and API, and the key's `last_used_at`. What a process counted in its last
minute is written when it stops; a crash loses at most that minute.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from grantkey.db import keys as key_store
from grantkey.db import usage as store
from grantkey.db.cluster import Cluster
from grantkey.db.failures import CLEANUP_ERRORS
from grantkey.domain.keys import KeyRecord, Principal, User
from grantkey.errors import KeyNotFound

log = logging.getLogger("grantkey.usage")
FLUSH_SECONDS = 60.0
MAX_DAYS = 366


class Usage:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        # database → (key id, api) → requests since the last write
        self._counts: dict[str, dict[tuple[str, str], int]] = defaultdict(
            lambda: defaultdict(int))

    def count(self, principal: Principal, api: str) -> None:
        self._counts[principal.user.database][(principal.key.id, api)] += 1

    def forget(self, database: str) -> None:
        """A deleted user's counts: nowhere to write them."""
        self._counts.pop(database, None)

    async def flush(self) -> None:
        """Write what was counted (each database apart: one that fails keeps its counts
        for the next try)."""
        pending, self._counts = self._counts, defaultdict(lambda: defaultdict(int))
        if not pending:
            return
        day = datetime.now(UTC).date()
        try:
            async with self.cluster.metadata() as meta:
                existing = await store.existing_databases(meta, sorted(pending))
        except CLEANUP_ERRORS as error:
            log.warning("key usage not written yet: %s", error)
            existing = set(pending)
        for database, counts in pending.items():
            if database not in existing:
                continue  # its user was deleted: nowhere to write them
            try:
                async with self.cluster.user_database(database) as conn:
                    await store.add(conn, day, dict(counts))
            except CLEANUP_ERRORS as error:
                log.warning("key usage not written yet: %s", error)
                mine = self._counts[database]
                for item, requests in counts.items():
                    mine[item] += requests

    async def flush_forever(self) -> None:
        try:
            while True:
                await asyncio.sleep(FLUSH_SECONDS)
                await self.flush()
        finally:
            await asyncio.shield(self.flush())

    async def report(self, principal: Principal, name: str, days: int) -> KeyUsage:
        """A key's requests per day and API over the last `days` days (the master, or the
        key itself), and when it was last used. What processes counted in the last minute
        is not there yet."""
        if not principal.is_master and name != principal.key.name:
            raise KeyNotFound(name)
        since = datetime.now(UTC).date() - timedelta(days=days - 1)
        async with self.cluster.user_database(principal.user.database) as conn:
            record = await key_store.find_by_name(conn, name)
            if record is None:
                raise KeyNotFound(name)
            rows = await store.days(conn, record.id, since)
        per_day: dict[date, dict[str, int]] = defaultdict(dict)
        for row in rows:
            per_day[row["day"]][row["api"]] = int(row["requests"])
        return KeyUsage(principal.user, record, since, dict(sorted(per_day.items())))


@dataclass(frozen=True)
class KeyUsage:
    user: User
    record: KeyRecord
    since: date
    days: dict[date, dict[str, int]]  # day → api → requests (days without any left out)
