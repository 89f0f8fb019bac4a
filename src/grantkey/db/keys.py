"""Key rows (in each user's private `grantkey_meta` schema) and key roles."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from grantkey.db.cluster import AdminConnection
from grantkey.db.managers import Managers, acting_as, as_admin
from grantkey.db.users import LOGIN_ROLE_OPTIONS
from grantkey.domain.keys import KeyRecord, KeyType
from grantkey.domain.rate_limits import rate_from_document
from grantkey.domain.restrictions import restrictions_from_document
from grantkey.domain.secrets_box import scram_verifier

_COLUMNS = (
    "id, name, type, role, token_digest, sealed_token, apis, services, table_metadata, "
    "created_at, updated_at, expires_at, sql_timeout, token_rotated_at, grace_digest, "
    "grace_until, grace_password, rate_limit, restrictions, last_used_at"
)
ORDERABLE = {"type": "type", "name": "name", "updated_at": "updated_at"}


def storable(text: str) -> bool:
    """PostgreSQL text holds no NUL and no lone surrogates: such a name cannot exist."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def record_from_row(row: dict[str, Any]) -> KeyRecord:
    return KeyRecord(
        id=row["id"], name=row["name"], type=KeyType(row["type"]), role=row["role"],
        token_digest=bytes(row["token_digest"]),
        sealed_token=None if row["sealed_token"] is None else bytes(row["sealed_token"]),
        apis=tuple(row["apis"]), services=tuple(row["services"]),
        table_metadata=row["table_metadata"],
        created_at=row["created_at"], updated_at=row["updated_at"],
        expires_at=row["expires_at"], sql_timeout=row["sql_timeout"],
        token_rotated_at=row["token_rotated_at"], grace_digest=_bytes(row["grace_digest"]),
        grace_until=row["grace_until"], grace_password=_bytes(row["grace_password"]),
        rate_limit=rate_from_document(row["rate_limit"]),
        restrictions=restrictions_from_document(row["restrictions"]),
        last_used_at=row["last_used_at"],
    )


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


async def insert_key(conn: AdminConnection, key: KeyRecord) -> None:
    await conn.execute(
        "INSERT INTO grantkey_meta.api_keys (id, name, type, role, token_digest, sealed_token, "
        "apis, services, table_metadata, expires_at, sql_timeout, rate_limit, restrictions) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [key.id, key.name, key.type.value, key.role, key.token_digest, key.sealed_token,
         list(key.apis), list(key.services), key.table_metadata, key.expires_at,
         key.sql_timeout, None if key.rate_limit is None else Jsonb(key.rate_limit.document()),
         None if key.restrictions is None else Jsonb(key.restrictions.document())],
    )


async def find_by_digest(conn: AdminConnection, token_digest: bytes) -> KeyRecord | None:
    """The key whose token this is: its current one, or its old one in a grace (the
    caller tells which by comparing digests, and checks the grace's end)."""
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM grantkey_meta.api_keys WHERE token_digest = %s "
        "OR grace_digest = %s LIMIT 1",
        [token_digest, token_digest],
    )
    row = await cur.fetchone()
    return None if row is None else record_from_row(row)


async def find_by_name(conn: AdminConnection, name: str) -> KeyRecord | None:
    if not storable(name):
        return None
    cur = await conn.execute(
        f"SELECT {_COLUMNS} FROM grantkey_meta.api_keys WHERE name = %s", [name]
    )
    row = await cur.fetchone()
    return None if row is None else record_from_row(row)


async def count_regular(conn: AdminConnection) -> int:
    cur = await conn.execute("SELECT count(*) AS n FROM grantkey_meta.api_keys WHERE type = 'regular'")
    row = await cur.fetchone()
    return int(row["n"]) if row else 0


async def list_keys(
    conn: AdminConnection, *, types: list[str], only_id: str | None,
    order: str, descending: bool, limit: int, offset: int,
    unused_for: float | None = None, expiring_within: float | None = None,
) -> tuple[int, list[KeyRecord]]:
    """One page of keys, master first, then default, then regular; and the exact total.
    `unused_for`: only keys not used (nor made) in that many seconds; `expiring_within`:
    only keys that expire in that many seconds from now (not those expired already)."""
    where: sql.Composable = sql.SQL("type = ANY(%(types)s::text[])")
    if only_id is not None:
        where = sql.SQL("{} AND id = %(only_id)s").format(where)
    if unused_for is not None:
        where = sql.SQL("{} AND coalesce(last_used_at, created_at) < "
                        "now() - make_interval(secs => %(unused_for)s)").format(where)
    if expiring_within is not None:
        where = sql.SQL("{} AND expires_at > now() AND expires_at <= "
                        "now() + make_interval(secs => %(expiring_within)s)").format(where)
    params = {"types": types, "only_id": only_id, "limit": limit, "offset": offset,
              "unused_for": unused_for, "expiring_within": expiring_within}
    cur = await conn.execute(
        sql.SQL("SELECT count(*) AS n FROM grantkey_meta.api_keys WHERE {}").format(where), params
    )
    total_row = await cur.fetchone()
    direction = sql.SQL("DESC" if descending else "ASC")
    query = sql.SQL(
        "SELECT {columns} FROM grantkey_meta.api_keys WHERE {where} ORDER BY "
        "CASE type WHEN 'master' THEN 0 WHEN 'default' THEN 1 ELSE 2 END, "
        "{order} {direction}, name {direction} LIMIT %(limit)s OFFSET %(offset)s"
    ).format(
        columns=sql.SQL(_COLUMNS), where=where,
        order=sql.Identifier(ORDERABLE[order]), direction=direction,
    )
    cur = await conn.execute(query, params)
    records = [record_from_row(row) for row in await cur.fetchall()]
    return (int(total_row["n"]) if total_row else 0), records


async def delete_key_row(conn: AdminConnection, key_id: str) -> None:
    await conn.execute("DELETE FROM grantkey_meta.api_keys WHERE id = %s", [key_id])
    await conn.execute("DELETE FROM grantkey_meta.key_usage WHERE key_id = %s", [key_id])


@dataclass(frozen=True)
class Grace:
    """A regenerated key's old token, still accepted until `seconds` from now."""

    digest: bytes
    seconds: int
    sealed_password: bytes  # the new role password, opened only with the old token


async def update_token(
    conn: AdminConnection, key_id: str, token_digest: bytes, sealed: bytes | None,
    grace: Grace | None = None,
) -> None:
    """The key's new token; an earlier grace ends (one old token at a time)."""
    await conn.execute(
        "UPDATE grantkey_meta.api_keys SET token_digest = %s, sealed_token = %s, "
        "updated_at = now(), token_rotated_at = now(), grace_digest = %s, "
        "grace_until = now() + make_interval(secs => %s), grace_password = %s WHERE id = %s",
        [token_digest, sealed, None if grace is None else grace.digest,
         None if grace is None else grace.seconds,
         None if grace is None else grace.sealed_password, key_id],
    )


async def create_key_role(
    conn: AdminConnection, role: str, password: str, reader_role: str | None, owner_role: str,
    managers: Managers | None = None, valid_until: datetime | None = None,
) -> None:
    """A key's LOGIN role, a member of the reader role, with the owner role a member of it.
    With `managers` (see `db.managers`): made by the maker, the owner's membership in the
    same statement, then given the reader role by the granter. Without a reader role (a
    named map's publishing key: only its own grants), CONNECT on the database instead.
    `valid_until`: PostgreSQL itself refuses the role's login from then on (an expiring key)."""
    verifier: sql.Composable = sql.Literal(scram_verifier(password))
    if valid_until is not None:
        verifier = sql.SQL("{} VALID UNTIL {}").format(
            verifier, sql.Literal(valid_until.astimezone(UTC).isoformat()))
    if managers is not None:
        await acting_as(conn, managers.maker)
        await conn.execute(sql.SQL("CREATE ROLE {} {} PASSWORD {} ROLE {}").format(
            sql.Identifier(role), LOGIN_ROLE_OPTIONS, verifier, sql.Identifier(owner_role)))
        if reader_role is not None:
            await acting_as(conn, managers.granter)
            await conn.execute(sql.SQL("GRANT {} TO {}").format(
                sql.Identifier(reader_role), sql.Identifier(role)))
        await as_admin(conn)
    else:
        member_of = sql.SQL("") if reader_role is None else sql.SQL(" IN ROLE {}").format(
            sql.Identifier(reader_role))
        await conn.execute(sql.SQL("CREATE ROLE {} {} PASSWORD {}{}").format(
            sql.Identifier(role), LOGIN_ROLE_OPTIONS, verifier, member_of))
        await conn.execute(
            sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(owner_role)))
    if reader_role is None:
        cur = await conn.execute("SELECT pg_catalog.current_database()::text AS db")
        row = await cur.fetchone()
        assert row is not None
        await conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            sql.Identifier(row["db"]), sql.Identifier(role)))


async def set_role_password(conn: AdminConnection, role: str, password: str) -> None:
    await conn.execute(
        sql.SQL("ALTER ROLE {} PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(scram_verifier(password))
        )
    )


async def delete_key_row_by_role(conn: AdminConnection, role: str) -> None:
    await conn.execute("DELETE FROM grantkey_meta.api_keys WHERE role = %s", [role])
