"""Connections logged in as key roles, pooled per (database, role, password).

Client SQL only ever runs on these. The pool is bounded in total; when it is full, the
connection idle longest is closed first, whatever its role; requests wait in one FIFO
line, and one that cannot get a connection within a bounded wait fails with PoolExhausted.
Fair shares: one key (role) may hold at most `key_limit` connections at once and one user
(database) at most `user_limit`; a request over its share waits without holding up the
requests behind it that are within theirs.
A connection goes back only after ROLLBACK (if a transaction was left open) and DISCARD ALL.
A SQL API query has its DISCARD ALL pipelined behind it (`pg_wire`), read back before the
release; otherwise the DISCARD ALL is sent when the connection is released and its answer
read when it is next taken. Either way the session is reset before reuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

import psycopg
from psycopg.pq import TransactionStatus

from grantkey.db.pg_wire import finish_reset, send_reset, send_reset_at_once, still_connected
from grantkey.errors import DatabaseUnavailable, LoginRefused, PoolExhausted

RoleConnection = psycopg.AsyncConnection[tuple[object, ...]]


def left_busy(conn: RoleConnection) -> bool:
    """Closed, or still in the middle of a command (a COPY cut short): not fit for reuse."""
    return conn.closed or conn.info.transaction_status == TransactionStatus.ACTIVE
# libpq's messages when PostgreSQL refuses a key role's login: a changed password, a
# dropped role, a role that lost LOGIN (a revocation in progress).
LOGIN_REFUSALS = ("password authentication failed", "does not exist",
                  "is not permitted to log in")

PoolKey = tuple[str, str, int]


@dataclass(frozen=True)
class RoleTarget:
    database: str
    role: str
    conninfo: str

    @property
    def key(self) -> PoolKey:
        return self.database, self.role, hash(self.conninfo)


@dataclass(eq=False)
class _Idle:
    conn: RoleConnection
    since: float


class _IdleConnections:
    """Idle connections, per key (the newest taken first, so a key's spares age) and all
    together by age: the one idle longest is closed first to make room, whatever its key
    (a key in steady use keeps its connections; one not used for a while loses its own,
    spares first as they are the older)."""

    def __init__(self) -> None:
        self._by_key: dict[PoolKey, list[_Idle]] = {}
        self._by_age: OrderedDict[_Idle, PoolKey] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_age)

    def pool_keys(self) -> list[PoolKey]:
        return list(self._by_key)

    def put(self, key: PoolKey, conn: RoleConnection) -> None:
        item = _Idle(conn, time.monotonic())
        self._by_key.setdefault(key, []).append(item)
        self._by_age[item] = key

    def take(self, key: PoolKey) -> RoleConnection | None:
        items = self._by_key.get(key)
        if not items:
            return None
        item = items.pop()
        if not items:
            del self._by_key[key]
        del self._by_age[item]
        return item.conn

    def take_oldest(self, older_than: float | None = None) -> RoleConnection | None:
        """The connection idle longest (if idle since `older_than` or before)."""
        if not self._by_age:
            return None
        item, key = next(iter(self._by_age.items()))
        if older_than is not None and item.since > older_than:
            return None
        del self._by_age[item]
        items = self._by_key[key]
        items.remove(item)
        if not items:
            del self._by_key[key]
        return item.conn

    def take_all(self, key: PoolKey) -> list[RoleConnection]:
        items = self._by_key.pop(key, [])
        for item in items:
            del self._by_age[item]
        return [item.conn for item in items]


@dataclass
class _Waiter:
    target: RoleTarget
    future: asyncio.Future[RoleConnection | None]

    @property
    def key(self) -> PoolKey:
        return self.target.key


class RolePools:
    """Requests that find the pool full wait in one FIFO line. A released connection goes
    straight to the first waiter for its role; any other change wakes the first waiter to
    try again (open a connection or close an idle one of the least recently used role)."""

    def __init__(self, max_connections: int, wait_seconds: float, idle_seconds: float,
                 key_share: float = 1.0, user_share: float = 1.0) -> None:
        self.max_connections = max_connections
        self.wait_seconds = wait_seconds
        self.idle_seconds = idle_seconds
        self.key_limit = max(1, int(max_connections * key_share))
        self.user_limit = max(1, int(max_connections * user_share))
        self._idle = _IdleConnections()
        self._open = 0
        # connections held (or reserved) by requests, per role and per database
        self._held_by_role: Counter[tuple[str, str]] = Counter()
        self._held_by_database: Counter[str] = Counter()
        self._waiters: deque[_Waiter] = deque()
        self._closing: set[asyncio.Future[None]] = set()
        # connections whose DISCARD ALL went out on release, its answer still to be read
        # (a session reset with its query has nothing left to read)
        self._unread_resets: weakref.WeakSet[RoleConnection] = weakref.WeakSet()

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def held(self, database: str, role: str | None = None) -> int:
        """Connections held by requests of one user, or of one of its roles."""
        if role is None:
            return self._held_by_database[database]
        return self._held_by_role[(database, role)]

    def _within_share(self, target: RoleTarget) -> bool:
        return (self._held_by_role[(target.database, target.role)] < self.key_limit
                and self._held_by_database[target.database] < self.user_limit)

    def _hold(self, target: RoleTarget) -> None:
        self._held_by_role[(target.database, target.role)] += 1
        self._held_by_database[target.database] += 1

    def _unhold(self, target: RoleTarget) -> None:
        role = (target.database, target.role)
        self._held_by_role[role] -= 1
        if self._held_by_role[role] <= 0:
            del self._held_by_role[role]
        self._held_by_database[target.database] -= 1
        if self._held_by_database[target.database] <= 0:
            del self._held_by_database[target.database]

    async def acquire(self, target: RoleTarget) -> RoleConnection:
        """A connection for `target`, counted against its key's and user's shares until it
        is released (`release`, `release_at_once`)."""
        deadline = time.monotonic() + self.wait_seconds
        first_try = True
        while True:
            # newcomers queue behind waiters that could go (not behind those over a share)
            if self._within_share(target) and not (first_try and self._someone_may_go()):
                self._hold(target)
                try:
                    conn = await self._take_or_open(target)
                except BaseException:
                    self._unhold(target)
                    raise
                if conn is not None:
                    return conn
                self._unhold(target)
            first_try = False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PoolExhausted(
                    f"Too many concurrent queries: no database connection became free "
                    f"within {self.wait_seconds:g} s. Try again shortly."
                )
            handed = await self._wait(target, remaining)  # held for us when handed
            if handed is not None:
                try:
                    fit = await self._fit(handed)
                except BaseException:  # cancelled: _fit closes the connection
                    self._unhold(target)
                    raise
                if fit:
                    return handed
                self._unhold(target)
            elif not self._within_share(target):
                self._wake_first()  # woken but over its share now: pass the wake on

    def _someone_may_go(self) -> bool:
        return any(self._within_share(w.target) for w in self._waiters
                   if not w.future.done())

    async def _take_or_open(self, target: RoleTarget) -> RoleConnection | None:
        """An idle connection of this role, else a new one if a slot is (or can be) free."""
        reused = await self._take_idle(target.key)
        if reused is not None:
            return reused
        victim = None
        if self._open < self.max_connections:
            self._open += 1
        else:
            victim = self._pop_least_recently_used()  # its slot passes to this request
            if victim is None:
                return None
        try:
            if victim is not None:
                with contextlib.suppress(psycopg.Error):
                    await victim.close()
            return await self._connect(target)
        except BaseException:
            self._forget_one()
            raise

    async def _wait(self, target: RoleTarget, timeout: float) -> RoleConnection | None:
        """A connection handed over, or None when woken to try again or out of time.

        A plain future and a timer: no task or shield for each wait (every request that
        finds the pool full waits here)."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(target, loop.create_future())
        self._waiters.append(waiter)
        timer = loop.call_later(timeout, self._give_up, waiter)
        try:
            return await waiter.future
        except BaseException:
            self._abandon(waiter)
            raise
        finally:
            timer.cancel()

    def _give_up(self, waiter: _Waiter) -> None:
        """Out of time: leave the line (acquire() then finds no time left)."""
        if not waiter.future.done():
            self._waiters.remove(waiter)
            waiter.future.set_result(None)

    def _abandon(self, waiter: _Waiter) -> None:
        """Cancelled while waiting (its future is cancelled too, unless already resolved)."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            return
        if waiter.future.cancelled():
            return
        # handed a connection, or woken, just as it gave up: pass it on
        handed = waiter.future.result()
        if handed is not None:
            self._unhold(waiter.target)
            self._put_idle(waiter.key, handed)
        else:
            self._wake_first()

    def _put_idle(self, key: PoolKey, conn: RoleConnection) -> None:
        """A connection nobody holds: straight to the first waiter of its role that is
        within its shares (held for it from here), else idle."""
        for waiter in self._waiters:
            if (waiter.key == key and not waiter.future.done()
                    and self._within_share(waiter.target)):
                self._waiters.remove(waiter)
                self._hold(waiter.target)
                waiter.future.set_result(conn)
                return
        self._idle.put(key, conn)
        self._wake_first()

    def _wake_first(self) -> None:
        """Something changed (a slot, an idle connection, a share): the first waiter that
        is within its shares tries again."""
        for waiter in list(self._waiters):
            if waiter.future.done():  # a cancelled one is leaving the line anyway
                self._waiters.remove(waiter)
            elif self._within_share(waiter.target):
                self._waiters.remove(waiter)
                waiter.future.set_result(None)
                return

    async def release(self, target: RoleTarget, conn: RoleConnection, *, reusable: bool) -> None:
        self._unhold(target)
        if reusable and not conn.closed:
            try:
                if conn.info.transaction_status != TransactionStatus.IDLE:
                    await conn.rollback()
                await send_reset(conn)
                self._unread_resets.add(conn)
            except psycopg.Error:
                reusable = False
            except BaseException:  # cancelled halfway: the slot must not leak
                self._close_later(conn)
                raise
        if not reusable or conn.closed:
            await self._close(conn)
            return
        self._put_idle(target.key, conn)

    def release_at_once(self, target: RoleTarget, conn: RoleConnection, *,
                        already_reset: bool = False) -> bool:
        """The common release, without suspending (so it cannot be cancelled halfway): the
        session is idle and was reset with its query (`already_reset`), else its DISCARD
        ALL goes out at once. False: use `release`."""
        if conn.closed or conn.info.transaction_status != TransactionStatus.IDLE:
            return False
        if not already_reset:
            if not send_reset_at_once(conn):
                return False
            self._unread_resets.add(conn)
        self._unhold(target)
        self._put_idle(target.key, conn)
        return True

    async def discard_role(self, database: str, role: str) -> None:
        """Close every idle connection of one role (after its key was revoked)."""
        for key in [k for k in self._idle.pool_keys() if k[0] == database and k[1] == role]:
            for conn in self._idle.take_all(key):
                await self._close(conn)

    async def close_idle(self, older_than: float | None = None) -> int:
        cutoff = time.monotonic() - (self.idle_seconds if older_than is None else older_than)
        closed = 0
        while (conn := self._idle.take_oldest(cutoff)) is not None:
            await self._close(conn)
            closed += 1
        return closed

    async def reap_forever(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.idle_seconds / 4))
            await self.close_idle()

    async def _take_idle(self, key: PoolKey) -> RoleConnection | None:
        while (conn := self._idle.take(key)) is not None:
            if await self._fit(conn):
                return conn
        return None

    async def _fit(self, conn: RoleConnection) -> bool:
        """Finish the reset of a connection taken from the pool, if its answer is unread;
        close it if that failed or the server closed the session meanwhile."""
        fit = True
        if conn in self._unread_resets:
            self._unread_resets.discard(conn)
            try:
                fit = await finish_reset(conn)
            except BaseException:  # cancelled meanwhile: the connection must not leak
                self._close_later(conn)
                raise
        fit = fit and still_connected(conn)
        if not fit:
            await self._close(conn)
        return fit

    def _close_later(self, conn: RoleConnection) -> None:
        """Close in a task of its own (the caller is being cancelled); the slot goes back."""
        closing = asyncio.ensure_future(self._close(conn))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    def _pop_least_recently_used(self) -> RoleConnection | None:
        """Take the connection idle longest to close, keeping its slot."""
        return self._idle.take_oldest()

    async def _connect(self, target: RoleTarget) -> RoleConnection:
        try:
            # No automatic prepared statements: DISCARD ALL between requests deallocates them.
            conn = await psycopg.AsyncConnection.connect(
                target.conninfo, autocommit=True, prepare_threshold=None)
        except psycopg.OperationalError as error:
            text = str(error)
            if any(refusal in text for refusal in LOGIN_REFUSALS):
                raise LoginRefused("the key's role refused the login") from None
            raise DatabaseUnavailable(f"PostgreSQL is unavailable: {type(error).__name__}") from None
        return conn

    async def probe_login(self, target: RoleTarget) -> None:
        """Log in once outside the pool and leave: LoginRefused if PostgreSQL refuses."""
        conn = await self._connect(target)
        with contextlib.suppress(psycopg.Error):
            await conn.close()

    async def _close(self, conn: RoleConnection) -> None:
        with contextlib.suppress(psycopg.Error):
            await conn.close()
        self._forget_one()

    def _forget_one(self) -> None:
        self._open -= 1
        self._wake_first()

    async def close(self) -> None:
        while (conn := self._idle.take_oldest()) is not None:
            await self._close(conn)
