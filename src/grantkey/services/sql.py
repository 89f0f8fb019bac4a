"""SQL API use case: run a client's SQL as the key's own role, streamed, time-limited.

`SqlService.start` composes the query (a page, the geometry as GeoJSON: `composed_query`)
and runs it up to its first rows; the `RunningQuery` it returns owns the connection and
gives it back itself (`aclose()`, `async with`), once, whatever cancels its caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from grantkey.db import postgis, privileges, sessions, storage_quota
from grantkey.db.cluster import Cluster
from grantkey.db.failures import CLEANUP_ERRORS, DatabaseError
from grantkey.db.pg_wire import CopyRefused
from grantkey.db.role_pools import RoleConnection, RolePools, RoleTarget, left_busy
from grantkey.db.sql_errors import connection_lost, translate
from grantkey.db.sql_exec import Column, Execution, QueryTimedOut
from grantkey.db.wrapping import wrap
from grantkey.domain.denials import denial_hint, denied_object
from grantkey.domain.keys import Principal, User
from grantkey.domain.secrets_box import SecretBox
from grantkey.domain.tokens import digest
from grantkey.errors import (
    BadInput,
    DatabaseUnavailable,
    LoginRefused,
    QueryInterrupted,
    SqlError,
    Unauthorized,
)
from grantkey.services.expiry import ExpiryWatch
from grantkey.services.lru import Lru
from grantkey.services.quota_keeper import QuotaKeeper
from grantkey.services.repair import RoleRepair
from grantkey.services.resolver import KeyResolver, usable

GEOJSON_COLUMN = "__grantkey_geojson"  # the geometry as GeoJSON text, added by the wrapping
PAGEABLE = re.compile(r"\s*(select|with)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Page:
    """CARTO's `rows_per_page` and `page` (counted from 0)."""

    rows: int
    number: int


def composed_query(query: str, *, page: Page | None = None,
                   geojson_digits: int | None = None) -> str:
    """Paging wraps a SELECT (CARTO's rule); GeoJSON adds the geometry as GeoJSON text in
    `GEOJSON_COLUMN`, with `geojson_digits` decimal places. The client's SQL is wrapped,
    never edited (`db/wrapping.py`); with neither, it is sent exactly as it came."""
    stripped = query.strip().rstrip(";")
    geojson = None if geojson_digits is None else (geojson_digits, GEOJSON_COLUMN)
    limits = None
    if page is not None and PAGEABLE.match(stripped):
        limits = (page.rows, page.rows * page.number)
    if geojson is None and limits is None:
        return query
    return wrap(stripped, geojson=geojson, page=limits)


async def run_shielded(work: Coroutine[Any, Any, None]) -> None:
    """Run cleanup to its end even if the awaiting task is cancelled (again)."""
    task = asyncio.ensure_future(work)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(task)


async def _release(pools: RolePools, execution: Execution, target: RoleTarget,
                   conn: RoleConnection) -> None:
    """Stop what still runs; the connection goes back to its pool, or is closed if a
    command was interrupted or the time limit stopped it (`Execution.close`)."""
    reusable = await execution.close()
    await pools.release(target, conn, reusable=reusable)


class RunningQuery:
    """A started query: its columns (with type names) and its rows, streamed. It owns its
    connection: `aclose()` (or leaving `async with`) gives it back, once (later calls do
    nothing), and finishes even when the caller is cancelled meanwhile (the client went
    away). The time limit closes it too, whatever its reader does. The rows of a
    `complete` query are all in memory: they can still be read after `aclose()`."""

    def __init__(self, execution: Execution, pools: RolePools, target: RoleTarget,
                 conn: RoleConnection, type_names: dict[int, str], started: float,
                 quota: tuple[QuotaKeeper, str] | None) -> None:
        self._execution = execution
        self._pools = pools
        self._target = target
        self._conn = conn
        self._type_names = type_names
        self._started = started
        self._quota = quota  # a user with a storage quota: sweep afterwards
        self.released = False
        # the time limit closes the query even if its reader never does. A cycle (execution
        # -> bound method -> self) until `aclose` breaks it: a request must leave nothing
        # to the cyclic garbage collector (tests/db/test_no_cyclic_garbage.py)
        execution.on_stopped = self.aclose

    @property
    def columns(self) -> list[Column]:
        return self._execution.columns

    def type_name(self, column: Column) -> str:
        return self._type_names.get(column.type_oid, "unknown")

    @property
    def elapsed(self) -> float:
        return round(time.monotonic() - self._started, 3)

    @property
    def total_rows(self) -> int:
        return self._execution.rowcount

    @property
    def complete(self) -> bool:
        """Every row is already here (the query ended with its first batch)."""
        return self._execution.finished

    def rows(self) -> AsyncIterator[tuple[Any, ...]]:
        return self._execution.rows()

    async def __aenter__(self) -> RunningQuery:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Give the connection back (once), even while the caller is being cancelled."""
        if self.released:
            return
        self.released = True
        execution = self._execution
        execution.on_stopped = None  # breaks execution -> aclose -> self -> execution
        if self._quota is not None:
            keeper, database = self._quota
            keeper.leave(database)
        if execution.finished and not execution.timed_out:
            execution.stop_timers()
            if self._pools.release_at_once(self._target, self._conn,
                                           already_reset=execution.reset_done):
                return  # the usual case: no task needed to protect it from cancellation
        await run_shielded(_release(self._pools, execution, self._target, self._conn))


def no_postgis(feature: str) -> str:
    """The 400 for `feature` on a server without PostGIS: what to install, and how."""
    return (f"{feature} needs PostGIS, which is not installed on this server: on Debian/Ubuntu, "
            "apt-get install postgresql-postgis, then run grantkey on a new data directory (a "
            "data directory keeps the PostgreSQL that made it) or with GRANTKEY_PG_BIN_DIR naming "
            "a PostgreSQL of the same major version that has PostGIS")


NO_POSTGIS = no_postgis("format=geojson")


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
        self._with_postgis: Lru[str, bool] = Lru(target_cache_size)
        # deriving the password and building the conninfo cost more than the query itself
        self._targets: Lru[tuple[str, str, str], RoleTarget] = Lru(target_cache_size)
        self.repair: RoleRepair | None = None
        self.quota = QuotaKeeper(cluster)
        self.expiry = ExpiryWatch(cluster, pools, self.forget_role)

    def target_for(self, principal: Principal) -> RoleTarget:
        role, database = principal.key.role, principal.user.database
        cache_key = (database, role, principal.token)
        target = self._targets.get(cache_key)
        if target is None:
            password = principal.password or self.box.role_password(role, principal.token)
            target = RoleTarget(database, role,
                                self.cluster.role_conninfo(database, role, password))
            self._targets.put(cache_key, target)
            if principal.key.expires_at is not None:
                self.expiry.watch(database, role, principal.key.expires_at)
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

    async def start(self, principal: Principal, query: str, *,
                    params: Sequence[Any] | None = None, page: Page | None = None,
                    geojson_digits: int | None = None) -> RunningQuery:
        """Run `query` (composed: `composed_query`; `params` bound to `$1`, `$2`…) up to
        its first rows. Errors here get a proper status. A user with a storage quota has
        their database swept while it runs and after (QuotaKeeper)."""
        if geojson_digits is not None:
            await self.require_postgis(principal.user)
        query = composed_query(query, page=page, geojson_digits=geojson_digits)
        if principal.user.storage_quota == "-1":
            return await self._start(principal, query, params, None)
        database = principal.user.database
        self.quota.enter(database)
        try:
            return await self._start(principal, query, params, (self.quota, database))
        except BaseException:
            self.quota.leave(database)
            raise

    @contextlib.asynccontextmanager
    async def session(self, principal: Principal) -> AsyncIterator[RoleConnection]:
        """A session of the key's role for work other than one query (COPY), counted in
        the key's and user's shares, swept by the storage quota while held. PostgreSQL's
        errors from inside become SQL API errors (a revoked key's lost session: 401); other
        exceptions pass as they are. A session left busy (a COPY cut short) is closed, not
        reused."""
        target = self.target_for(principal)
        database = principal.user.database
        quota = principal.user.storage_quota != "-1"
        if quota:
            self.quota.enter(database)
        try:
            conn, target = await self._acquire(principal, target)
            await self._still_usable(principal, target, conn)
            released = False
            try:
                yield conn
            except (DatabaseError, QueryTimedOut, CopyRefused) as error:
                if not connection_lost(error):
                    raise translate(error) from None
                released = True
                await run_shielded(self.pools.release(target, conn, reusable=False))
                await self._lost(principal, target)  # 401 if the key was revoked
                raise QueryInterrupted from None
            finally:
                if not released:
                    await run_shielded(self._give_back(target, conn))
        finally:
            if quota:
                self.quota.leave(database)

    async def require_postgis(self, user: User, feature: str = "format=geojson") -> None:
        if self._with_postgis.get(user.database):
            return
        async with self.cluster.user_database(user.database) as conn:
            if await postgis.installed(conn):
                self._with_postgis.put(user.database, True)
                return
        if await self.cluster.postgis_available():
            raise BadInput(f"{feature} needs PostGIS, which this user's database does not "
                           "have (it was made before PostGIS was installed on the server, or "
                           "with no superuser to install it)")
        raise BadInput(no_postgis(feature))

    async def _start(self, principal: Principal, query: str, params: Sequence[Any] | None,
                     quota: tuple[QuotaKeeper, str] | None) -> RunningQuery:
        target = self.target_for(principal)
        conn, target = await self._acquire(principal, target)
        await self._still_usable(principal, target, conn)
        limit = self.limit_for(principal)
        execution = Execution(conn, query, limit, self.terminate, params)
        started = time.monotonic()
        try:
            await execution.start()
        except Exception as error:
            await run_shielded(_release(self.pools, execution, target, conn))
            if connection_lost(error):
                await self._lost(principal, target)  # 401 if the key was revoked
                raise QueryInterrupted from None
            if principal.stop_time is not None:  # cut because the key expired: 401
                usable(principal)
            raise await self.explained(principal, translate(error)) from None
        except BaseException:  # cancelled: the client went away mid-query
            await run_shielded(_release(self.pools, execution, target, conn))
            raise
        try:  # the type names may need an admin connection, which may fail
            names = await self._names(principal.user.database, execution.columns, conn)
        except BaseException:
            await run_shielded(_release(self.pools, execution, target, conn))
            raise
        return RunningQuery(execution, self.pools, target, conn, names, started, quota)

    @staticmethod
    def until_stop(principal: Principal, limit: float) -> float:
        """`limit`, or the seconds until the principal's token stops working if sooner."""
        stops = principal.stop_time
        if stops is None:
            return limit
        return min(limit, max(stops - time.time(), 0.001))

    def limit_for(self, principal: Principal, server_limit: float | None = None) -> float:
        """Seconds a statement of `principal` may run: the server's limit for its key type
        (or `server_limit`), the key's own if lower, and never past the moment its token
        stops working (its expiry, its grace's end): it is cancelled then, as at a time
        limit."""
        if server_limit is None:
            server_limit = self.master_time_limit if principal.is_master else self.time_limit
        return self.until_stop(principal, min(server_limit,
                                              principal.key.sql_timeout or server_limit))

    async def _acquire(self, principal: Principal,
                       target: RoleTarget) -> tuple[RoleConnection, RoleTarget]:
        """A session of the key's role, and the target it logged in with. A refused login
        of a key that is still valid means its token was just regenerated with a grace (this
        token now logs in with the new password) or a client changed the role's password
        (restored): either way, try once more."""
        for attempt in (1, 2):
            try:
                return await self.pools.acquire(target), target
            except LoginRefused:
                self.resolver.cache.evict(principal.user.id, digest(principal.token))
                usable(principal)  # refused since it expired: say so
                if attempt == 1 and (rotated := await self._rotated(principal)) is not None:
                    principal, target = rotated, self.target_for(rotated)
                    continue
                if attempt == 2 or self.repair is None or not await self.repair.restore_login(
                        principal):
                    raise Unauthorized("the key's role refused the login") from None
            except DatabaseUnavailable:
                await self._lost(principal, target)  # a login cut short by a revocation: 401
                raise
        raise AssertionError("unreachable")

    async def explained(self, principal: Principal, error: SqlError) -> SqlError:
        """A permission-denied error with a hint of what the key holds on the object it
        names (PostgreSQL's own hint, if any, kept first). Never fails the answer."""
        named = denied_object(error.message) if error.status == 403 else None
        if named is None or principal.is_master:
            return error
        try:
            async with self.cluster.user_database(principal.user.database) as conn:
                held = await privileges.held_privileges(conn, principal.key.role, *named)
        except CLEANUP_ERRORS:
            return error
        hint = denial_hint(principal.key.name, named[0], held)
        if hint is not None:
            error.hint = hint if not error.hint else f"{error.hint} {hint}"
        return error

    async def _still_usable(self, principal: Principal, target: RoleTarget,
                            conn: RoleConnection) -> None:
        """The token may have stopped (expiry, grace) while a session was found for it:
        then the session goes back unused and the answer is the token's 401."""
        if principal.stop_time is None:
            return
        try:
            usable(principal)
        except Unauthorized:
            await run_shielded(self.pools.release(target, conn, reusable=True))
            raise

    async def _rotated(self, principal: Principal) -> Principal | None:
        """The token as the key's row sees it now, if it logs in with another password
        (its key was regenerated with a grace); Unauthorized if it no longer works."""
        current = await self.resolver.resolve(principal.user, principal.token, fresh=True)
        if current.password == principal.password:
            return None
        self._targets.pop((principal.user.database, principal.key.role, principal.token))
        return current

    async def _lost(self, principal: Principal, target: RoleTarget) -> None:
        """The session ended under the query: a revoked key answers 401. PostgreSQL's login
        is the last word (a revocation commits before any session of the role is ended,
        while the key's row may change an instant later)."""
        self.resolver.cache.evict(principal.user.id, digest(principal.token))
        usable(principal)  # expired meanwhile: say so
        try:
            await self.pools.probe_login(target)
        except LoginRefused:
            if self.repair is None or not await self.repair.restore_login(principal):
                raise Unauthorized("the key's role refused the login") from None
        except DatabaseUnavailable:
            pass
        await self.resolver.resolve(principal.user, principal.token, fresh=True)

    async def _give_back(self, target: RoleTarget, conn: RoleConnection) -> None:
        """A session left busy (a COPY cut short) has its statement cancelled (a closed
        socket stops a backend only when it next writes), and is closed."""
        busy = left_busy(conn)
        if busy and not conn.closed:
            with contextlib.suppress(DatabaseError):
                await conn.cancel_safe(timeout=2)
        await self.pools.release(target, conn, reusable=not busy)

    async def over_quota(self, database: str) -> str | None:
        """The storage quota's hint if the database is over its limit now."""
        async with self.cluster.user_database(database) as conn:
            return await storage_quota.over_quota(conn)

    async def terminate(self, pid: int) -> None:
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
