"""An expiring key's sessions end when it expires, in every process that used it.

The resolver refuses the key from that moment on (each request checks), PostgreSQL refuses
its login (the role's VALID UNTIL) and statements are cut then (`SqlService.limit_for`);
what remains are sessions: idle ones in this process's pools, and busy ones (a COPY, a
batch job) anywhere. A process that resolved the key ends them at its expiry; every such
process does, which is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from grantkey.db import revocations as store
from grantkey.db.cluster import Cluster
from grantkey.db.failures import CLEANUP_ERRORS
from grantkey.db.role_pools import RolePools

log = logging.getLogger("grantkey.expiry")
RoleName = tuple[str, str]  # (database, role)


class ExpiryWatch:
    def __init__(self, cluster: Cluster, pools: RolePools,
                 forget_role: Callable[[str, str], None]) -> None:
        self.cluster = cluster
        self.pools = pools
        self.forget_role = forget_role
        self._timers: dict[RoleName, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def watch(self, database: str, role: str, expires_at: datetime) -> None:
        """End the role's sessions at `expires_at` (once per role and process)."""
        name = (database, role)
        if name in self._timers:
            return
        delay = max((expires_at - datetime.now(UTC)).total_seconds(), 0.0)
        self._timers[name] = asyncio.get_running_loop().call_later(delay, self._fire, name)

    def watching(self, database: str, role: str) -> bool:
        return (database, role) in self._timers

    def _fire(self, name: RoleName) -> None:
        task = asyncio.ensure_future(self.end(*name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def end(self, database: str, role: str) -> None:
        """Never raises: a failure is logged (statements were cut by their deadline and
        the login is refused anyway)."""
        self._timers.pop((database, role), None)
        self.forget_role(database, role)
        await self.pools.discard_role(database, role)
        try:
            async with self.cluster.metadata() as conn:
                oid = await store.role_oid(conn, role)
                if oid:
                    await store.terminate_sessions(conn, oid)
        except CLEANUP_ERRORS as error:
            log.warning("could not end the sessions of an expired key's role: %s", error)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()
