"""Connections logged in as key roles, pooled per (database, role, password).

Client SQL only ever runs on these. The pool is bounded in total; when it is full, idle
connections of the least recently used roles are closed first; a request that cannot get
a connection within a bounded wait fails with PoolExhausted. A connection goes back only
after ROLLBACK (if a transaction was left open) and DISCARD ALL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass

import psycopg
from psycopg.pq import TransactionStatus

from grantkey.errors import DatabaseUnavailable, LoginRefused, PoolExhausted

RoleConnection = psycopg.AsyncConnection[tuple[object, ...]]


@dataclass(frozen=True)
class RoleTarget:
    database: str
    role: str
    conninfo: str

    @property
    def key(self) -> tuple[str, str, int]:
        return self.database, self.role, hash(self.conninfo)


@dataclass
class _Idle:
    conn: RoleConnection
    since: float


class RolePools:
    def __init__(self, max_connections: int, wait_seconds: float, idle_seconds: float) -> None:
        self.max_connections = max_connections
        self.wait_seconds = wait_seconds
        self.idle_seconds = idle_seconds
        self._idle: OrderedDict[tuple[str, str, int], list[_Idle]] = OrderedDict()
        self._open = 0
        self._changed = asyncio.Condition()

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return sum(len(items) for items in self._idle.values())

    async def acquire(self, target: RoleTarget) -> RoleConnection:
        deadline = time.monotonic() + self.wait_seconds
        while True:
            reused = self._take_idle(target.key)
            if reused is not None:
                return reused
            async with self._changed:
                if self._open >= self.max_connections and not await self._evict_lru():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise PoolExhausted(
                            f"Too many concurrent queries: no database connection became free "
                            f"within {self.wait_seconds:g} s. Try again shortly."
                        )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), remaining)
                    continue
                self._open += 1
            try:
                return await self._connect(target)
            except BaseException:
                await self._forget_one()
                raise

    async def release(self, target: RoleTarget, conn: RoleConnection, *, reusable: bool) -> None:
        if reusable and not conn.closed:
            try:
                if conn.info.transaction_status != TransactionStatus.IDLE:
                    await conn.rollback()
                await conn.execute("DISCARD ALL")
            except psycopg.Error:
                reusable = False
        if not reusable or conn.closed:
            await self._close(conn)
            return
        self._idle.setdefault(target.key, []).append(_Idle(conn, time.monotonic()))
        self._idle.move_to_end(target.key)
        async with self._changed:
            self._changed.notify()

    async def discard_role(self, database: str, role: str) -> None:
        """Close every idle connection of one role (after its key was revoked)."""
        for key in [k for k in self._idle if k[0] == database and k[1] == role]:
            for item in self._idle.pop(key, []):
                await self._close(item.conn)

    async def close_idle(self, older_than: float | None = None) -> int:
        cutoff = time.monotonic() - (self.idle_seconds if older_than is None else older_than)
        closed = 0
        for key in list(self._idle):
            keep = []
            for item in self._idle[key]:
                if item.since <= cutoff:
                    await self._close(item.conn)
                    closed += 1
                else:
                    keep.append(item)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        return closed

    async def reap_forever(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.idle_seconds / 4))
            await self.close_idle()

    def _take_idle(self, key: tuple[str, str, int]) -> RoleConnection | None:
        items = self._idle.get(key)
        while items:
            item = items.pop()
            if not items:
                del self._idle[key]
            if not item.conn.closed:
                return item.conn
            self._open -= 1
        return None

    async def _evict_lru(self) -> bool:
        """Close one idle connection of the least recently used role. Caller holds the lock."""
        for key in list(self._idle):
            items = self._idle[key]
            item = items.pop(0)
            if not items:
                del self._idle[key]
            self._open -= 1
            with contextlib.suppress(psycopg.Error):
                await item.conn.close()
            return True
        return False

    async def _connect(self, target: RoleTarget) -> RoleConnection:
        try:
            # No automatic prepared statements: DISCARD ALL between requests deallocates them.
            conn = await psycopg.AsyncConnection.connect(
                target.conninfo, autocommit=True, prepare_threshold=None)
        except psycopg.OperationalError as error:
            text = str(error)
            if "password authentication failed" in text or "does not exist" in text:
                raise LoginRefused("the key's role refused the login") from None
            raise DatabaseUnavailable(f"PostgreSQL is unavailable: {type(error).__name__}") from None
        return conn

    async def _close(self, conn: RoleConnection) -> None:
        with contextlib.suppress(psycopg.Error):
            await conn.close()
        await self._forget_one()

    async def _forget_one(self) -> None:
        async with self._changed:
            self._open -= 1
            self._changed.notify()

    async def close(self) -> None:
        for key in list(self._idle):
            for item in self._idle.pop(key):
                await self._close(item.conn)
