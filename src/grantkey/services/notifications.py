"""LISTEN for key and user changes from every grantkey process; drop them from the caches."""

from __future__ import annotations

import asyncio
import logging

from grantkey.db.notify import listening
from grantkey.errors import DatabaseUnavailable
from grantkey.services.container import Services
from grantkey.services.events import CHANNEL, deleted_username, payload_role, rotated_role

log = logging.getLogger("grantkey.notifications")
RETRY_SECONDS = 1.0


async def listen_for_revocations(services: Services) -> None:
    """Runs until cancelled. On any disconnection the whole cache is cleared."""
    while True:
        try:
            async with listening(services.cluster.conninfo("grantkey"), CHANNEL) as payloads:
                _forget_everything(services)
                # revocations decided while no LISTEN was in place were not heard: act on
                # every one whose cleanup is still owed (the rest have no role left)
                await _end_pending_revocations(services)
                async for payload in payloads:
                    await _apply(services, payload)
        except asyncio.CancelledError:
            raise
        except DatabaseUnavailable as error:
            log.warning("revocation listener lost its connection: %s", error)
        _forget_everything(services)  # changes may be missed while disconnected
        await asyncio.sleep(RETRY_SECONDS)


def _forget_everything(services: Services) -> None:
    services.cache.clear()
    services.sql.forget_all()
    services.users.forget()
    services.tile_tokens.forget_all()


async def _apply(services: Services, payload: str) -> None:
    username = deleted_username(payload)
    if username is not None:
        known = services.users.known(username)
        if known is not None:  # what this process counted of its keys has nowhere to go
            services.usage.forget(known.database)
        services.users.forget(username)
        services.cache.clear()  # rare: simpler than finding that user's keys
        services.sql.forget_all()
        return
    rotated = rotated_role(payload)
    if rotated is not None:
        user_id, database, role = rotated
        services.cache.evict_user(user_id)
        services.sql.forget_role(database, role)
        return
    services.cache.evict_payload(payload)
    target = payload_role(payload)
    if target is not None:
        services.tile_tokens.forget_all()
        database, role, oid, recorded_at = target
        services.sql.forget_role(database, role)
        await services.pools.discard_role(database, role)
        # the revoking process may have died right after its commit: end the role's
        # sessions from here too (every process does; it is idempotent) — only those that
        # logged in before the revocation was recorded: by now a regenerated key's new
        # token may be in use, in sessions of the same role (the revoking process itself
        # ends them all, right after its commit, before anyone has the new token)
        await services.revoker.end_sessions(oid, started_before=recorded_at)


async def _end_pending_revocations(services: Services) -> None:
    for database, role, oid in await services.revoker.pending_roles():
        services.sql.forget_role(database, role)
        await services.pools.discard_role(database, role)
        await services.revoker.end_sessions(oid)
