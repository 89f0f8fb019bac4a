"""Named maps (templates) in the metadata database: the template as its client wrote it and
who publishes it (the key whose rights its tiles have, its token sealed)."""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb

from grantkey.db.cluster import AdminConnection

NAMED_MAPS_DDL = """
CREATE TABLE IF NOT EXISTS public.named_maps (
    user_id      text NOT NULL REFERENCES public.users(id) ON DELETE CASCADE,
    name         text NOT NULL,
    template     jsonb NOT NULL,
    key_id       text NOT NULL,
    key_name     text NOT NULL,
    sealed_token bytea NOT NULL,
    own_key      boolean NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, name)
);
ALTER TABLE public.layergroups ADD COLUMN IF NOT EXISTS template text
"""
_COLUMNS = "name, template, key_id, key_name, sealed_token, own_key, updated_at"


async def insert(conn: AdminConnection, user_id: str, name: str, template: dict[str, Any],
                 key_id: str, key_name: str, sealed: bytes, own_key: bool) -> bool:
    """False if the user already has a template of that name."""
    cur = await conn.execute(
        "INSERT INTO public.named_maps (user_id, name, template, key_id, key_name, "
        "sealed_token, own_key) VALUES (%s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (user_id, name) DO NOTHING",
        [user_id, name, Jsonb(template), key_id, key_name, sealed, own_key])
    return cur.rowcount == 1


async def replace(conn: AdminConnection, user_id: str, name: str, template: dict[str, Any],
                  key_id: str, key_name: str, sealed: bytes, own_key: bool) -> None:
    await conn.execute(
        "UPDATE public.named_maps SET template = %s, key_id = %s, key_name = %s, "
        "sealed_token = %s, own_key = %s, updated_at = pg_catalog.clock_timestamp() "
        "WHERE user_id OPERATOR(pg_catalog.=) %s AND name OPERATOR(pg_catalog.=) %s",
        [Jsonb(template), key_id, key_name, sealed, own_key, user_id, name])
    await delete_layergroups(conn, user_id, name)


async def get(conn: AdminConnection, user_id: str, name: str) -> dict[str, Any] | None:
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM public.named_maps "
        "WHERE user_id OPERATOR(pg_catalog.=) %s AND name OPERATOR(pg_catalog.=) %s",
        [user_id, name])
    return await cur.fetchone()


async def names(conn: AdminConnection, user_id: str, key_id: str | None) -> list[str]:
    """The user's templates (`key_id`: only those that key published), by name."""
    cur = await conn.execute(
        "SELECT name FROM public.named_maps WHERE user_id OPERATOR(pg_catalog.=) %s "
        "AND (%s::text IS NULL OR key_id OPERATOR(pg_catalog.=) %s::text) ORDER BY name",
        [user_id, key_id, key_id])
    return [str(row["name"]) for row in await cur.fetchall()]


async def count(conn: AdminConnection, user_id: str) -> int:
    cur = await conn.execute(
        "SELECT pg_catalog.count(*) AS n FROM public.named_maps "
        "WHERE user_id OPERATOR(pg_catalog.=) %s", [user_id])
    row = await cur.fetchone()
    return 0 if row is None else int(row["n"])


async def delete_layergroups(conn: AdminConnection, user_id: str, name: str) -> None:
    """The layergroups of every version of a template (`template` is `<name>/<version>`)."""
    await conn.execute(
        "DELETE FROM public.layergroups WHERE user_id OPERATOR(pg_catalog.=) %s "
        "AND pg_catalog.split_part(template, '/', 1) OPERATOR(pg_catalog.=) %s",
        [user_id, name])


async def delete(conn: AdminConnection, user_id: str, name: str) -> None:
    await conn.execute(
        "DELETE FROM public.named_maps "
        "WHERE user_id OPERATOR(pg_catalog.=) %s AND name OPERATOR(pg_catalog.=) %s",
        [user_id, name])
    await delete_layergroups(conn, user_id, name)
