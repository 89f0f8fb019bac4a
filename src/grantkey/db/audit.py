"""The audit log: one append-only table in the metadata database, which no key role can
reach (CONNECT on it is revoked from PUBLIC at bootstrap).

A row says who (the key, by name and type, never its token; the client's address, or
`cli`), of which user, did what (the event type, the key it concerned, a small JSON
detail) and when (the time of the transaction it was written in, which is the
transaction of the change itself). Rows name users by id and username, with no foreign
key: deleting a user deletes none of its history.

Append-only even for grantkey's own admin: UPDATE, DELETE and TRUNCATE are revoked from
the role that creates the table (its owner; the grants follow the table to a later owner),
and triggers refuse them for everyone, a superuser included (only dropping the triggers,
which needs the table's owner, could lift that; grantkey never does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from grantkey.db.cluster import AdminConnection
from grantkey.domain.audit import AuditEntry

AUDIT_DDL = """
CREATE TABLE public.audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT pg_catalog.now(),
    user_id     text NOT NULL,
    username    text NOT NULL,
    event       text NOT NULL,
    actor_key   text,
    actor_type  text,
    client      text NOT NULL,
    key_name    text,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_user ON public.audit_log (user_id, id);
CREATE FUNCTION public.audit_log_refuse_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $refuse$
BEGIN
  RAISE EXCEPTION 'the audit log is append-only: % refused', tg_op
    USING ERRCODE = '42501';
END
$refuse$;
REVOKE ALL ON FUNCTION public.audit_log_refuse_change() FROM PUBLIC;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON public.audit_log
    FOR EACH ROW EXECUTE FUNCTION public.audit_log_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON public.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION public.audit_log_refuse_change();
REVOKE UPDATE, DELETE, TRUNCATE ON public.audit_log FROM PUBLIC, CURRENT_USER
"""

_COLUMNS = "id, at, username, event, actor_key, actor_type, client, key_name, detail"


@dataclass(frozen=True)
class AuditRow:
    """One row to append: who, of which user, did what."""

    user_id: str
    username: str
    event: str
    client: str
    actor_key: str | None
    actor_type: str | None
    key_name: str | None
    detail: dict[str, Any]


async def install(conn: AdminConnection) -> None:
    await conn.execute(AUDIT_DDL)


async def append(conn: AdminConnection, row: AuditRow) -> None:
    """In the caller's transaction: the row exists if and only if the change commits."""
    await conn.execute(
        "INSERT INTO public.audit_log (user_id, username, event, actor_key, actor_type, "
        "client, key_name, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        [row.user_id, row.username, row.event, row.actor_key, row.actor_type, row.client,
         row.key_name, Jsonb(row.detail)])


async def page(conn: AdminConnection, user_id: str, *, key_name: str | None,
               events: list[str] | None, limit: int, offset: int,
               ) -> tuple[int, list[AuditEntry]]:
    """One page of a user's events, newest first, and the exact total. `key_name` keeps the
    events made by that key or about it; `events` keeps those types."""
    where: list[sql.Composable] = [sql.SQL("user_id = %(user_id)s")]
    if key_name is not None:
        where.append(sql.SQL("(actor_key = %(name)s OR key_name = %(name)s)"))
    if events is not None:
        where.append(sql.SQL("event = ANY(%(events)s::text[])"))
    condition = sql.SQL(" AND ").join(where)
    params = {"user_id": user_id, "name": key_name, "events": events, "limit": limit,
              "offset": offset}
    cur = await conn.execute(sql.SQL(
        "SELECT count(*) AS n FROM public.audit_log WHERE {}").format(condition), params)
    total = await cur.fetchone()
    cur = await conn.execute(sql.SQL(
        "SELECT {} FROM public.audit_log WHERE {} ORDER BY id DESC "
        "LIMIT %(limit)s OFFSET %(offset)s").format(sql.SQL(_COLUMNS), condition), params)
    entries = [AuditEntry(**row) for row in await cur.fetchall()]
    return (int(total["n"]) if total else 0), entries
