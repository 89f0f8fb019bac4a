"""Administrative access to the PostgreSQL cluster.

The admin login (CREATEDB, CREATEROLE) is used only for grantkey's own work: metadata,
provisioning and key look-ups. Client SQL never runs on these connections, and neither
does tenant code: every admin session starts with the settings in `ADMIN_SESSION`, sent in
the startup packet, where they outrank whatever a tenant set with `ALTER DATABASE … SET` or
`ALTER ROLE … SET`. Above all `search_path` holds only `pg_catalog` and `pg_temp`: a
function or operator a tenant planted in `public` (say `public.starts_with(name, text)`,
which matches a `name` argument better than the built-in) is then not even visible; and
`role` is pinned to none, so that a database owner's `ALTER DATABASE … SET role` cannot
make grantkey's sessions (the superuser's included) start as another role.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from grantkey.errors import DatabaseUnavailable

log = logging.getLogger("grantkey.cluster")
METADATA_DATABASE = "grantkey"
WATCH_SECONDS = 0.5  # how often each process checks that PostgreSQL answers
# What both kinds of session pin, with the same value: no time limits, read-write, read
# committed, no role switched to, and the settings that change how SQL text and values are
# read and written (dates, times, bytea, strings, client encoding, notices, NULL in arrays,
# backslashes, `= NULL`).
COMMON_SESSION = {
    "role": "none",
    "default_transaction_read_only": "off",
    "default_transaction_isolation": "read\\ committed",
    "statement_timeout": "0",
    "lock_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
    "idle_session_timeout": "0",
    "DateStyle": "ISO",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "bytea_output": "hex",
    "standard_conforming_strings": "on",
    "client_encoding": "UTF8",
    "client_min_messages": "notice",
    "array_nulls": "on",
    "backslash_quote": "safe_encoding",
    "transform_null_equals": "off",
}
ADMIN_SESSION = {"search_path": "pg_catalog,pg_temp", **COMMON_SESSION}
# Settings of newer servers only (an unknown name in the startup packet is fatal), pinned
# where the server has them: no transaction time limit, and no self-granted SET or INHERIT
# on the roles a CREATEROLE admin creates (`db.managers` relies on holding neither).
ADMIN_SESSION_SINCE = {160000: {"createrole_self_grant": ""}, 170000: {"transaction_timeout": "0"}}
# Pinned on every key-role session the same way: a client can `ALTER ROLE CURRENT_USER SET`
# its own defaults (statement_timeout = 1, read-only, another search path, another date
# style, another time zone, backslashes read as escapes) and so break its key, or change
# what its SQL means, for every later session, the default public key above all;
# settings from the startup packet outrank those. Clients can still SET them per query.
KEY_SESSION = {
    "search_path": '"$user",\\ public',  # as PostgreSQL's default shows it
    **COMMON_SESSION,
    "extra_float_digits": "1",
    "xmloption": "content",
    "xmlbinary": "base64",
    "row_security": "on",
    "timezone_abbreviations": "Default",
    "quote_all_identifiers": "off",
}
KEY_SESSION_SINCE = {170000: {"transaction_timeout": "0"}}


def session_options(pinned: dict[str, str], since: dict[int, dict[str, str]],
                    server_version: int | None) -> str:
    """The startup packet's options: `pinned`, and what `since` adds for this server (none
    while its version is unknown: the metadata and maintenance databases, which no tenant
    owns)."""
    settings = dict(pinned)
    for version, extra in since.items():
        if server_version is not None and server_version >= version:
            settings.update(extra)
    return " ".join(f"-c {name}={value}" for name, value in settings.items())
AdminConnection = psycopg.AsyncConnection[dict[str, Any]]


class Cluster:
    """Pools of admin connections: one to the metadata database, a few per user database."""

    def __init__(self, admin_url: str, *, max_user_pools: int = 32,
                 superuser_url: str | None = None) -> None:
        self.admin_url = admin_url
        self.superuser_url = superuser_url
        self._max_user_pools = max_user_pools
        self._metadata: AsyncConnectionPool[AdminConnection] | None = None
        self._postgis: bool | None = None
        self._user_pools: OrderedDict[str, AsyncConnectionPool[AdminConnection]] = OrderedDict()
        self._pools_lock = asyncio.Lock()
        self.down_since: float | None = None  # set by `watch_forever` while unreachable
        self.server_version: int | None = None  # known once `open` has connected

    def conninfo(self, dbname: str, **overrides: Any) -> str:
        """An admin connection string, with the pinned session settings."""
        return admin_conninfo(self.admin_url, self.server_version, dbname=dbname, **overrides)

    def role_conninfo(self, dbname: str, role: str, password: str) -> str:
        """Where a key's own role logs in: same server, its own name and password."""
        params = conninfo_to_dict(self.admin_url)
        params.pop("passfile", None)
        params.update(dbname=dbname, user=role, password=password,
                      options=session_options(KEY_SESSION, KEY_SESSION_SINCE,
                                              self.server_version))
        return make_conninfo("", **params)

    def _pool(self, dbname: str, max_size: int) -> AsyncConnectionPool[AdminConnection]:
        return AsyncConnectionPool(
            self.conninfo(dbname),
            min_size=0,
            max_size=max_size,
            kwargs={"row_factory": dict_row},
            open=False,
            timeout=10,
            max_idle=60,
            name=f"admin:{dbname}",
            connection_class=psycopg.AsyncConnection[dict[str, Any]],
        )

    async def open(self) -> None:
        self._metadata = self._pool(METADATA_DATABASE, 8)
        await self._metadata.open()
        async with self._metadata.connection() as conn:
            self.server_version = conn.info.server_version

    async def close(self) -> None:
        pools = list(self._user_pools.values())
        self._user_pools.clear()
        if self._metadata is not None:
            pools.append(self._metadata)
            self._metadata = None
        # at once, each with a short wait for its connections (the process is stopping)
        await asyncio.gather(*(pool.close(timeout=1.0) for pool in pools),
                             return_exceptions=True)

    async def ping(self) -> None:
        """Returns if the metadata database answers; DatabaseUnavailable otherwise."""
        async with self.metadata() as conn:
            await conn.execute("SELECT 1")

    async def postgis_available(self) -> bool:
        """Can user databases have PostGIS (is the extension installed on the server)?
        Asked once per process: the answer changes only with the server's packages."""
        if self._postgis is None:
            try:
                async with self.metadata() as conn:
                    cur = await conn.execute(
                        "SELECT EXISTS (SELECT FROM pg_catalog.pg_available_extensions "
                        "WHERE name = 'postgis') AS available")
                    row = await cur.fetchone()
            except (psycopg.ProgrammingError, psycopg.DataError, psycopg.InternalError) as error:
                # the list reads every extension's control file: one that is broken or
                # unreadable fails it; that is no reason to fail a health check
                log.warning("cannot list PostgreSQL's extensions: %s", error)
                return False
            assert row is not None
            self._postgis = bool(row["available"])
        return self._postgis

    async def max_connections(self) -> int:
        """PostgreSQL's max_connections."""
        async with self.metadata() as conn:
            cur = await conn.execute("SELECT pg_catalog.current_setting('max_connections') AS n")
            row = await cur.fetchone()
        assert row is not None
        return int(row["n"])

    def check_available(self) -> None:
        """Fail fast while PostgreSQL is known to be unreachable (no pool wait)."""
        if self.down_since is not None:
            raise DatabaseUnavailable("PostgreSQL is unavailable: it is being restarted or "
                                      "cannot be reached")

    async def watch_forever(self, interval: float = WATCH_SECONDS) -> None:
        """Runs until cancelled: one connection of its own asks `SELECT 1` every `interval`.
        A failure marks PostgreSQL down (requests fail at once, `check_available`, and those
        already waiting on a pool fail as it is replaced); the first success after it marks
        it up and replaces the admin pools again, whose reconnection back-off would
        otherwise keep answering 503 for many seconds. Its connection closes when cancelled."""
        held: list[AdminConnection] = []
        try:
            while True:
                await self._watch_once(held, interval)
                await asyncio.sleep(interval if self.down_since is None else interval / 2)
        finally:
            for conn in held:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _watch_once(self, held: list[AdminConnection], interval: float) -> None:
        try:
            if not held or held[0].closed:
                held[:] = [await psycopg.AsyncConnection.connect(
                    self.conninfo(METADATA_DATABASE), autocommit=True, connect_timeout=2,
                    row_factory=dict_row)]
            await asyncio.wait_for(held[0].execute("SELECT 1"), interval * 2)
            if self.down_since is not None:
                await self._replace_pools()
                log.warning("PostgreSQL is reachable again after %.1f s",
                            time.monotonic() - self.down_since)
                self.down_since = None
        except (psycopg.Error, OSError, TimeoutError):
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.warning("PostgreSQL is unreachable: requests answer 503 until it is back")
                await self._replace_pools()  # who waits on the old pools fails now
            for conn in held:
                with contextlib.suppress(Exception):
                    await conn.close()
            held.clear()

    async def _replace_pools(self) -> None:
        self._postgis = None  # PostgreSQL came back: perhaps another one, asked again
        old = list(self._user_pools.values())
        self._user_pools.clear()
        if self._metadata is not None:
            old.append(self._metadata)
            self._metadata = self._pool(METADATA_DATABASE, 8)
            await self._metadata.open()
        for pool in old:
            with contextlib.suppress(Exception):
                await pool.close(timeout=1)

    @asynccontextmanager
    async def metadata(self) -> AsyncIterator[AdminConnection]:
        """A connection to the metadata database inside one transaction."""
        if self._metadata is None:
            raise DatabaseUnavailable("the cluster is not open")
        self.check_available()
        async with translated(), self._metadata.connection() as conn:
            yield conn

    @asynccontextmanager
    async def user_database(self, dbname: str) -> AsyncIterator[AdminConnection]:
        """An admin connection to one user's database inside one transaction."""
        self.check_available()
        async with translated(), (await self._user_pool(dbname)).connection() as conn:
            yield conn

    async def _user_pool(self, dbname: str) -> AsyncConnectionPool[AdminConnection]:
        pool = self._user_pools.get(dbname)
        if pool is not None:
            self._user_pools.move_to_end(dbname)
            return pool
        async with self._pools_lock:
            pool = self._user_pools.get(dbname)
            if pool is None:
                pool = self._pool(dbname, 4)
                await pool.open()
                self._user_pools[dbname] = pool
                while len(self._user_pools) > self._max_user_pools:
                    _, oldest = self._user_pools.popitem(last=False)
                    await oldest.close()
            return pool

    async def forget_database(self, dbname: str) -> None:
        """Close the pool of a database about to be dropped."""
        pool = self._user_pools.pop(dbname, None)
        if pool is not None:
            await pool.close()

    @asynccontextmanager
    async def superuser_session(self, dbname: str) -> AsyncIterator[AdminConnection]:
        """A transaction as the superuser, for what nothing else can do (the guard, PostGIS,
        handing an earlier release's objects to the routine admin). Without a superuser URL
        it is the admin's own login: callers check `is_superuser` before acting."""
        url = self.superuser_url or self.admin_url
        async with translated():
            conn = await psycopg.AsyncConnection.connect(
                admin_conninfo(url, self.server_version, dbname=dbname), row_factory=dict_row)
            try:
                async with conn.transaction():
                    yield conn
            finally:
                await conn.close()

    @asynccontextmanager
    async def autocommit(self, dbname: str = METADATA_DATABASE) -> AsyncIterator[AdminConnection]:
        """A short-lived autocommit connection, for CREATE/DROP DATABASE."""
        self.check_available()
        async with translated():
            conn = await psycopg.AsyncConnection.connect(
                self.conninfo(dbname), autocommit=True, row_factory=dict_row
            )
            try:
                yield conn
            finally:
                await conn.close()


def admin_conninfo(admin_url: str, server_version: int | None = None, **overrides: Any) -> str:
    """`admin_url` with `overrides` and the pinned admin session settings (after any
    options the URL had, so ours win); those of newer servers where `server_version` has
    them."""
    params = conninfo_to_dict(admin_url)
    params.update(overrides)
    given = params.get("options")
    pinned = session_options(ADMIN_SESSION, ADMIN_SESSION_SINCE, server_version)
    params["options"] = f"{given} {pinned}" if given else pinned
    return make_conninfo("", **params)


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """A connection that fails becomes DatabaseUnavailable, its message on one line."""
    try:
        yield
    except psycopg.OperationalError as error:
        detail = " ".join(str(error).split())
        raise DatabaseUnavailable(f"PostgreSQL is unavailable: {detail}") from error
