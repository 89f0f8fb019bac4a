"""SQL API use case: run a client's SQL as the key's own role, streamed, time-limited."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any

from grantkey.db import sessions
from grantkey.db.cluster import Cluster
from grantkey.db.role_pools import RoleConnection, RolePools, RoleTarget
from grantkey.db.sql_errors import connection_lost, translate
from grantkey.db.sql_exec import Column, Execution
from grantkey.db.wrapping import wrap
from grantkey.domain.keys import Principal
from grantkey.domain.secrets_box import SecretBox
from grantkey.errors import DatabaseUnavailable, LoginRefused, QueryInterrupted, Unauthorized
from grantkey.services.lru import Lru
from grantkey.services.quota_keeper import QuotaKeeper
from grantkey.services.repair import RoleRepair
from grantkey.services.resolver import KeyResolver


def wrapped_query(query: str, *, geojson: tuple[int, str] | None = None,
                  page: tuple[int, int] | None = None) -> str:
    """The client's SQL wrapped, never edited: GeoJSON (digits, column), a page (limit,
    offset); `db/wrapping.py`."""
    return wrap(query, geojson=geojson, page=page)


@dataclass
class RunningQuery:
    """A started query: its columns (with type names) and its rows, streamed."""

    execution: Execution
    target: RoleTarget
    conn: RoleConnection
    type_names: dict[int, str]
    started: float
    released: bool = False
    quota_database: str | None = None  # a user with a storage quota: sweep afterwards

    @property
    def columns(self) -> list[Column]:
        return self.execution.columns

    def type_name(self, column: Column) -> str:
        return self.type_names.get(column.type_oid, "unknown")

    @property
    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 3)

    @property
    def total_rows(self) -> int:
        return self.execution.rowcount

    def rows(self) -> AsyncIterator[tuple[Any, ...]]:
        return self.execution.rows()


async def _shielded(work: Coroutine[Any, Any, None]) -> None:
    """Run cleanup to its end even if the awaiting task is cancelled (again)."""
    task = asyncio.ensure_future(work)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(task)


class SqlService:
    def __init__(
        self, cluster: Cluster, pools: RolePools, resolver: KeyResolver, box: SecretBox, *,
        time_limit: float, master_time_limit: float, target_cache_size: int = 10_000,
    ) -> None:
        self.cluster = cluster
        self.pools = pools
        self.resolver = resolver
        self.box = box
        self.time_limit = time_limit
        self.master_time_limit = master_time_limit
        self._type_names: Lru[tuple[str, int], str] = Lru(target_cache_size)
        # deriving the password and building the conninfo cost more than the query itself
        self._targets: Lru[tuple[str, str, str], RoleTarget] = Lru(target_cache_size)
        self.repair: RoleRepair | None = None
        self.quota = QuotaKeeper(cluster)

    def target_for(self, principal: Principal) -> RoleTarget:
        role, database = principal.key.role, principal.user.database
        cache_key = (database, role, principal.token)
        target = self._targets.get(cache_key)
        if target is None:
            password = self.box.role_password(role, principal.token)
            target = RoleTarget(database, role,
                                self.cluster.role_conninfo(database, role, password))
            self._targets.put(cache_key, target)
        return target

    def forget_role(self, database: str, role: str) -> None:
        """A revoked role: its connection strings (with the password derived from the old
        token) leave this process's memory."""
        self._targets.pop_where(lambda key: key[0] == database and key[1] == role)

    def forget_all(self) -> None:
        self._targets.clear()

    def remembers_role(self, database: str, role: str) -> bool:
        """Does this process still hold a connection string of the role?"""
        return any(key[:2] == (database, role) for key in self._targets)

    async def start(self, principal: Principal, query: str) -> RunningQuery:
        """Run `query` up to its first row. Errors here get a proper status. A user with a
        storage quota has their database swept while it runs and after (QuotaKeeper)."""
        if principal.user.storage_quota == "-1":
            return await self._start(principal, query)
        database = principal.user.database
        self.quota.enter(database)
        try:
            running = await self._start(principal, query)
        except BaseException:
            self.quota.leave(database)
            raise
        running.quota_database = database  # `finish` leaves
        return running

    async def _start(self, principal: Principal, query: str) -> RunningQuery:
        target = self.target_for(principal)
        conn = await self._acquire(principal, target)
        limit = self.master_time_limit if principal.is_master else self.time_limit
        execution = Execution(conn, query, limit, self._terminate)
        started = time.monotonic()
        try:
            await execution.start()
        except Exception as error:
            await _shielded(self._release(execution, target, conn))
            if connection_lost(error):
                await self._lost(principal, target)  # 401 if the key was revoked
                raise QueryInterrupted from None
            raise translate(error) from None
        except BaseException:  # cancelled: the client went away mid-query
            await _shielded(self._release(execution, target, conn))
            raise
        try:  # the type names may need an admin connection, which may fail
            names = await self._names(principal.user.database, execution.columns, conn)
        except BaseException:
            await _shielded(self._release(execution, target, conn))
            raise
        running = RunningQuery(execution, target, conn, names, started)
        execution.on_stopped = partial(self.finish, running)
        return running

    async def _acquire(self, principal: Principal, target: RoleTarget) -> RoleConnection:
        """A session of the key's role. A refused login of a key that is still valid means
        a client changed the role's password: restore it and try once more."""
        for attempt in (1, 2):
            try:
                return await self.pools.acquire(target)
            except LoginRefused:
                self.resolver.cache.evict(principal.user.id, principal.key.token_digest)
                if attempt == 2 or self.repair is None or not await self.repair.restore_login(
                        principal):
                    raise Unauthorized("the key's role refused the login") from None
            except DatabaseUnavailable:
                await self._lost(principal, target)  # a login cut short by a revocation: 401
                raise
        raise AssertionError("unreachable")

    async def finish(self, running: RunningQuery) -> None:
        """Give the connection back (once), even while the request is being cancelled."""
        if running.released:
            return
        running.released = True
        running.execution.on_stopped = None  # breaks execution -> finish -> running -> execution
        if running.quota_database is not None:
            self.quota.leave(running.quota_database)
        execution = running.execution
        if execution.finished and not execution.timed_out:
            execution.stop_timers()
            if self.pools.release_at_once(running.target, running.conn,
                                          already_reset=execution.reset_done):
                return  # the usual case: no task needed to protect it from cancellation
        await _shielded(self._release(running.execution, running.target, running.conn))

    async def _release(self, execution: Execution, target: RoleTarget,
                       conn: RoleConnection) -> None:
        reusable = await execution.close()
        await self.pools.release(target, conn, reusable=reusable)

    async def _lost(self, principal: Principal, target: RoleTarget) -> None:
        """The session ended under the query: a revoked key answers 401. PostgreSQL's login
        is the last word (a revocation commits before any session of the role is ended,
        while the key's row may change an instant later)."""
        self.resolver.cache.evict(principal.user.id, principal.key.token_digest)
        try:
            await self.pools.probe_login(target)
        except LoginRefused:
            if self.repair is None or not await self.repair.restore_login(principal):
                raise Unauthorized("the key's role refused the login") from None
        except DatabaseUnavailable:
            pass
        await self.resolver.resolve(principal.user, principal.token, fresh=True)

    async def _terminate(self, pid: int) -> None:
        with contextlib.suppress(Exception):
            async with self.cluster.metadata() as conn:
                await sessions.terminate_backend(conn, pid)

    async def _names(self, database: str, columns: list[Column],
                     conn: RoleConnection) -> dict[int, str]:
        names: dict[int, str] = {}
        unknown = []
        for column in columns:
            info = conn.adapters.types.get(column.type_oid)
            cached = self._type_names.get((database, column.type_oid))
            if info is not None:
                is_array = info.array_oid == column.type_oid and info.oid != column.type_oid
                names[column.type_oid] = ("_" if is_array else "") + info.name
            elif cached is not None:
                names[column.type_oid] = cached
            else:
                unknown.append(column.type_oid)
        if unknown:
            async with self.cluster.user_database(database) as admin:
                found = await sessions.type_names(admin, unknown)
            for oid, name in found.items():
                self._type_names.put((database, oid), name)
                names[oid] = name
        return names
