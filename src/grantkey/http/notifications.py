"""LISTEN for key changes from every grantkey process, and drop those keys from the cache."""

from __future__ import annotations

import asyncio
import logging

import psycopg

from grantkey.services.container import Services
from grantkey.services.revocation import CHANNEL, payload_role

log = logging.getLogger("grantkey.notifications")
RETRY_SECONDS = 1.0


async def listen_for_revocations(services: Services) -> None:
    """Runs until cancelled. On any disconnection the whole cache is cleared."""
    while True:
        try:
            conn = await psycopg.AsyncConnection.connect(
                services.cluster.conninfo("grantkey"), autocommit=True
            )
            async with conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                services.cache.clear()
                async for notice in conn.notifies():
                    services.cache.evict_payload(notice.payload)
                    target = payload_role(notice.payload)
                    if target is not None:
                        await services.pools.discard_role(*target)
        except asyncio.CancelledError:
            raise
        except psycopg.Error as error:
            log.warning("revocation listener lost its connection: %s", type(error).__name__)
        services.cache.clear()
        await asyncio.sleep(RETRY_SECONDS)
