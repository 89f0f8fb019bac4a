"""Layergroups (the Maps API's maps) kept in the metadata database: any process serves any
layergroup, and they outlive restarts; one unused for long is deleted (`expire`).

A row holds the normalised config (no credential), what the creation probe learnt of each
layer, the relations the layers read and a fingerprint of those relations' change counters:
when the fingerprint moves, the layergroup's `changed_at` (its cache buster) does too."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from grantkey.db.cluster import AdminConnection

LAYERGROUPS_DDL = """
CREATE TABLE IF NOT EXISTS public.layergroups (
    user_id      text NOT NULL REFERENCES public.users(id) ON DELETE CASCADE,
    hash         text NOT NULL,
    config       jsonb NOT NULL,
    shapes       jsonb NOT NULL,
    tables       oid[] NOT NULL,
    fingerprint  text NOT NULL,
    changed_at   timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, hash)
);
CREATE INDEX IF NOT EXISTS layergroups_last_used ON public.layergroups (last_used_at)
"""

_SAVE = """
INSERT INTO public.layergroups AS l (user_id, hash, config, shapes, tables, fingerprint, template,
                                    changed_at)
VALUES (%(user)s, %(hash)s, %(config)s, %(shapes)s, %(tables)s::oid[], %(fingerprint)s, %(template)s,
        CASE WHEN pg_catalog.cardinality(%(tables)s::oid[]) OPERATOR(pg_catalog.=) 0
             THEN 'epoch'::timestamptz ELSE pg_catalog.now() END)
ON CONFLICT (user_id, hash) DO UPDATE SET
    shapes = excluded.shapes, tables = excluded.tables, fingerprint = excluded.fingerprint,
    last_used_at = pg_catalog.now(),
    changed_at = CASE WHEN l.fingerprint OPERATOR(pg_catalog.=) excluded.fingerprint
                      THEN l.changed_at ELSE excluded.changed_at END
RETURNING changed_at
"""

# what the layers read: the change counters and storage of each relation (TRUNCATE and
# VACUUM FULL give a new relfilenode); counters PostgreSQL keeps per table, flushed within
# a second or so of a commit
_FINGERPRINT = """
SELECT pg_catalog.concat(
  pg_catalog.sum(COALESCE(s.n_tup_ins OPERATOR(pg_catalog.+) s.n_tup_upd
                          OPERATOR(pg_catalog.+) s.n_tup_del, 0)), ':',
  pg_catalog.string_agg(c.oid::text OPERATOR(pg_catalog.||) '/' OPERATOR(pg_catalog.||)
                        c.relfilenode::text, ',' ORDER BY c.oid)) AS fingerprint
FROM pg_catalog.pg_class c
LEFT JOIN pg_catalog.pg_stat_all_tables s ON s.relid OPERATOR(pg_catalog.=) c.oid
WHERE c.oid OPERATOR(pg_catalog.=) ANY (%s::oid[])
"""

_RELATIONS = """
SELECT DISTINCT c.oid::int8 AS oid
FROM ROWS FROM (pg_catalog.unnest(%s::text[]), pg_catalog.unnest(%s::text[]))
     AS r(schema_name, relation_name)
JOIN pg_catalog.pg_namespace n ON n.nspname OPERATOR(pg_catalog.=) r.schema_name
JOIN pg_catalog.pg_class c ON c.relnamespace OPERATOR(pg_catalog.=) n.oid
 AND c.relname OPERATOR(pg_catalog.=) r.relation_name
ORDER BY 1
"""


async def relation_oids(conn: AdminConnection, relations: list[tuple[str, str]]) -> list[int]:
    """The OIDs of (schema, name) relations, read from the catalog only."""
    if not relations:
        return []
    cur = await conn.execute(_RELATIONS, [[s for s, _ in relations], [n for _, n in relations]])
    return [int(row["oid"]) for row in await cur.fetchall()]


async def fingerprint(conn: AdminConnection, tables: list[int]) -> str:
    if not tables:
        return ""
    cur = await conn.execute(_FINGERPRINT, [tables])
    row = await cur.fetchone()
    return "" if row is None else str(row["fingerprint"])


async def save(conn: AdminConnection, *, user_id: str, hash: str, config: dict[str, Any],
               shapes: list[dict[str, Any]], tables: list[int], fingerprint: str,
               template: str | None) -> datetime:
    """Store (or refresh) a layergroup; its `changed_at` (moved if the fingerprint did).
    `template`: the named map it instantiates, if any."""
    cur = await conn.execute(_SAVE, {"user": user_id, "hash": hash, "config": Jsonb(config),
                                     "shapes": Jsonb(shapes), "tables": tables,
                                     "fingerprint": fingerprint, "template": template})
    row = await cur.fetchone()
    assert row is not None
    changed: datetime = row["changed_at"]
    return changed


async def get(conn: AdminConnection, user_id: str, hash: str) -> dict[str, Any] | None:
    cur = await conn.execute(
        "SELECT config, shapes, changed_at, template FROM public.layergroups "
        "WHERE user_id OPERATOR(pg_catalog.=) %s AND hash OPERATOR(pg_catalog.=) %s",
        [user_id, hash])
    return await cur.fetchone()


async def touch(conn: AdminConnection, user_id: str, hash: str) -> bool:
    """Mark a layergroup used now; False if it is gone (expired, its user deleted)."""
    cur = await conn.execute(
        "UPDATE public.layergroups SET last_used_at = pg_catalog.now() "
        "WHERE user_id OPERATOR(pg_catalog.=) %s AND hash OPERATOR(pg_catalog.=) %s", [user_id, hash])
    return cur.rowcount > 0


async def expire(conn: AdminConnection, idle_days: float) -> int:
    """Delete the layergroups unused for `idle_days`; how many."""
    cur = await conn.execute(
        "DELETE FROM public.layergroups WHERE last_used_at OPERATOR(pg_catalog.<) "
        "(pg_catalog.now() OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => %s))",
        [idle_days * 86400])
    return cur.rowcount
