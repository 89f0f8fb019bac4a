"""Revocation is immediate on every worker of a `--workers 2` server (invariant 7)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import psycopg
import pytest

from grantkey.domain.keys import Principal
from grantkey.domain.tokens import digest
from grantkey.errors import Unauthorized
from grantkey.services.container import Services
from grantkey.services.events import payload_role
from grantkey.services.notifications import _apply, listen_for_revocations
from tests.conftest import Account, KeyHandle
from tests.support import ServerProcess, apis_only

TRIALS = 40


def sql_on_every_worker(server: ServerProcess, account: Account, token: str) -> list[int]:
    """`SELECT 1` on the SQL API (which resolves the token through each worker's key cache
    and logs in from its pool, unlike the Auth API), on new connections until both workers
    have answered: the statuses."""
    responses = server.on_every_worker("GET", account.sql_url, timeout=10,
                                       params={"q": "SELECT 1", "api_key": token})
    return [response.status_code for response in responses]


@pytest.mark.slow  # 40 trials; test_sql_limits checks one regenerate on every worker
def test_old_token_is_refused_by_every_worker_right_after_delete(
    account: Account, server: ServerProcess
) -> None:
    for trial in range(TRIALS):
        with httpx.Client(timeout=10) as http:
            token = http.post(account.keys_url, params=account.master(), json={
                "name": f"r{trial}", "grants": apis_only("sql")}).json()["token"]
            before = sql_on_every_worker(server, account, token)  # cached and pooled in both
            assert set(before) == {200}, f"trial {trial}: {before}"
            assert http.delete(f"{account.keys_url}/r{trial}",
                               params=account.master()).status_code == 204
        after = sql_on_every_worker(server, account, token)
        assert set(after) == {401}, f"trial {trial}: {after}"


@pytest.mark.slow  # 40 trials; test_sql_limits checks one regenerate on every worker
def test_old_token_is_refused_by_every_worker_right_after_regenerate(
    account: Account, server: ServerProcess
) -> None:
    with httpx.Client(timeout=10) as http:
        token = http.post(account.keys_url, params=account.master(), json={
            "name": "rot", "grants": apis_only("sql")}).json()["token"]
        for trial in range(TRIALS):
            before = sql_on_every_worker(server, account, token)
            assert set(before) == {200}, f"trial {trial}: {before}"
            response = http.post(f"{account.keys_url}/rot/token/regenerate",
                                 params=account.master())
            old, token = token, response.json()["token"]
            after = sql_on_every_worker(server, account, old)
            assert set(after) == {401}, f"trial {trial}: {after}"


@pytest.mark.parametrize("action", ["delete", "regenerate"])
def test_open_sessions_of_a_revoked_key_role_are_terminated(
    http: httpx.Client, account: Account, make_key: Callable[..., KeyHandle], action: str
) -> None:
    key = make_key(account, "session", apis_only("sql"))
    conn = key.connect()
    assert conn.execute("SELECT 1").fetchone() == (1,)
    if action == "delete":
        response = http.delete(f"{account.keys_url}/session", params=account.master())
    else:
        response = http.post(f"{account.keys_url}/session/token/regenerate",
                             params=account.master())
    assert response.status_code in (200, 204)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(key.conninfo)


def test_a_stale_cache_entry_cannot_log_in(
    http: httpx.Client, account: Account, services: Services,
    run: Callable[[Awaitable[Any]], Any], make_key: Callable[..., KeyHandle],
) -> None:
    """The cache is never the last word: deleted by another process (the server), the key
    stays cached here (no listener in this process), and a query through that stale entry
    is refused because PostgreSQL refuses the role's login."""
    key = make_key(account, "cached", apis_only("sql"))
    principal: Principal = run(services.resolver.resolve(account.user, key.token, fresh=False))
    assert principal.key.role == key.role
    assert http.delete(f"{account.keys_url}/cached", params=account.master()).status_code == 204
    stale = services.cache.get(account.user.id, digest(key.token))
    assert stale is not None and stale.key.role == key.role
    with pytest.raises(Unauthorized):
        run(services.sql.start(stale, "SELECT 1"))
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(key.conninfo)


def test_notifications_from_another_process_evict_the_cache(
    account: Account, services: Services, run: Callable[[Awaitable[Any]], Any],
    make_key: Callable[..., KeyHandle],
) -> None:
    key = make_key(account, "notified", apis_only("sql"))

    async def scenario() -> bool:
        listener = asyncio.create_task(listen_for_revocations(services))
        await asyncio.sleep(0.5)
        await services.resolver.resolve(account.user, key.token, fresh=False)
        assert services.cache.get(account.user.id, digest(key.token)) is not None
        async with httpx.AsyncClient() as client:  # the server: another process
            await client.delete(f"{account.keys_url}/notified", params=account.master())
        evicted = False
        for _ in range(100):
            if services.cache.get(account.user.id, digest(key.token)) is None:
                evicted = True
                break
            await asyncio.sleep(0.02)
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        return evicted

    assert run(scenario())


def test_a_revoked_keys_derived_password_leaves_every_process_memory(
    account: Account, services: Services, run: Callable[[Awaitable[Any]], Any],
    make_key: Callable[..., KeyHandle],
) -> None:
    """The SQL API keeps each key's connection string (with the role password derived from
    its token) in memory: a revocation made here, or by another process (the NOTIFY),
    removes it at once, not at eviction."""
    here = make_key(account, "revoked-here", apis_only("sql"))
    elsewhere = make_key(account, "revoked-elsewhere", apis_only("sql"))

    async def remembered(token: str) -> str:
        principal = await services.resolver.resolve(account.user, token, fresh=True)
        services.sql.target_for(principal)
        assert services.sql.remembers_role(account.user.database, principal.key.role)
        return principal.key.role

    async def scenario() -> tuple[bool, bool]:
        listener = asyncio.create_task(listen_for_revocations(services))
        await asyncio.sleep(0.5)
        role_here, role_elsewhere = await remembered(here.token), await remembered(
            elsewhere.token)
        master = await services.keys.master_principal(account.user)
        await services.keys.delete(master, "revoked-here")
        gone_here = not services.sql.remembers_role(account.user.database, role_here)
        async with httpx.AsyncClient() as client:  # the server: another process
            await client.post(f"{account.keys_url}/revoked-elsewhere/token/regenerate",
                              params=account.master())
        gone_elsewhere = False
        for _ in range(100):
            if not services.sql.remembers_role(account.user.database, role_elsewhere):
                gone_elsewhere = True
                break
            await asyncio.sleep(0.02)
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        return gone_here, gone_elsewhere

    assert run(scenario()) == (True, True)


def test_another_process_applying_a_regenerate_spares_the_new_tokens_sessions(
    account: Account, services: Services, run: Callable[[Awaitable[Any]], Any],
    make_key: Callable[..., KeyHandle], admin_url: str,
) -> None:
    """Every process ends a revoked role's sessions on the NOTIFY (the revoking one may have
    died after its commit). A regenerated key keeps its role: by the time another process
    reads the notice, the new token may already be in use there, and those sessions must
    live (a CI run saw one answered 503 "session ended during the query"); the sessions
    opened before the regenerate still end."""
    key = make_key(account, "rolled", apis_only("sql"))
    with psycopg.connect(admin_url, dbname="grantkey", autocommit=True) as listener, \
            key.connect() as old_session:
        listener.execute("LISTEN grantkey_keys")
        master = run(services.keys.master_principal(account.user))
        new_token = run(services.keys.regenerate(master, "rolled")).token
        notice = next(listener.notifies(timeout=10, stop_after=1)).payload
        assert payload_role(notice) is not None
        target = services.sql.target_for(run(services.resolver.resolve(
            account.user, new_token, fresh=True)))
        with psycopg.connect(target.conninfo, autocommit=True) as new_session:
            run(_apply(services, notice))  # what another process does with the notice
            assert new_session.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError):
            old_session.execute("SELECT 1")
