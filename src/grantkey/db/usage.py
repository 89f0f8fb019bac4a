"""Key usage, in each user's database: requests per key, day (UTC) and API, and each key's
`last_used_at`; written by `services.usage` once a minute at most, never on a request."""

from __future__ import annotations

from datetime import date
from typing import Any

from grantkey.db.cluster import AdminConnection

TABLE = """
CREATE TABLE grantkey_meta.key_usage (
    key_id   text NOT NULL,
    day      date NOT NULL,
    api      text NOT NULL,
    requests bigint NOT NULL,
    PRIMARY KEY (key_id, day, api)
)
"""


async def add(conn: AdminConnection, day: date, counts: dict[tuple[str, str], int]) -> None:
    """Add `counts` ((key id, api) → requests) to `day`'s, and stamp each key used now."""
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO grantkey_meta.key_usage AS u (key_id, day, api, requests) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (key_id, day, api) "
            "DO UPDATE SET requests = u.requests OPERATOR(pg_catalog.+) EXCLUDED.requests",
            [(key_id, day, api, requests) for (key_id, api), requests in counts.items()])
    await conn.execute(
        "UPDATE grantkey_meta.api_keys SET last_used_at = pg_catalog.now() "
        "WHERE id OPERATOR(pg_catalog.=) ANY(%s::text[])",
        [sorted({key_id for key_id, _ in counts})])


async def days(conn: AdminConnection, key_id: str, since: date) -> list[dict[str, Any]]:
    cur = await conn.execute(
        "SELECT day, api, requests FROM grantkey_meta.key_usage "
        "WHERE key_id OPERATOR(pg_catalog.=) %s AND day OPERATOR(pg_catalog.>=) %s "
        "ORDER BY day, api", [key_id, since])
    return list(await cur.fetchall())


async def existing_databases(meta: AdminConnection, names: list[str]) -> set[str]:
    """Which of these databases still exist (a user deleted meanwhile: no longer)."""
    cur = await meta.execute(
        "SELECT datname::text AS name FROM pg_catalog.pg_database "
        "WHERE datname OPERATOR(pg_catalog.=) ANY(%s::text[])", [names])
    return {row["name"] for row in await cur.fetchall()}
