"""Grants through privilege roles, and reading a key's grants back from live ACLs.

A key role is never granted a table directly: a table's ACL lives in its `pg_class` row and
holds only about 2,400 grantees. Each (object, privilege) that any key needs gets one
NOLOGIN privilege role named from the object's OID; keys join those roles.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from grantkey.db.cluster import AdminConnection
from grantkey.db.keys import storable
from grantkey.domain import names
from grantkey.domain.grants import GrantsPlan

GRANTABLE_RELKINDS = ["r", "v", "m", "f", "p"]
HIDDEN_SCHEMAS = ["pg_catalog", "information_schema", "grantkey_meta", "pg_toast"]
OWNER_PRIVILEGES = ["delete", "insert", "references", "select", "trigger", "truncate", "update"]
PRIVILEGE_ROLE_PATTERN = r"^gk_[0-9a-f]+_[tnq][0-9]"


class MissingObject(Exception):
    """A granted table or schema does not exist in the user's database."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass
class LiveGrants:
    tables: list[dict[str, Any]] = field(default_factory=list)
    schemas: list[dict[str, Any]] = field(default_factory=list)


async def _one(conn: AdminConnection, query: str, params: list[Any]) -> dict[str, Any] | None:
    cur = await conn.execute(query, params)
    return await cur.fetchone()


async def _resolve_table(conn: AdminConnection, schema: str, name: str) -> dict[str, Any]:
    if not (storable(schema) and storable(name)):
        raise MissingObject("table")
    row = await _one(
        conn,
        "SELECT c.oid, c.relnamespace AS schema_oid FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind = ANY(%s) "
        "AND n.nspname <> ALL(%s) AND NOT starts_with(n.nspname, 'pg_')",
        [schema, name, GRANTABLE_RELKINDS, HIDDEN_SCHEMAS],
    )
    if row is None:
        raise MissingObject("table")
    return row


async def _resolve_schema(conn: AdminConnection, schema: str) -> int:
    if not storable(schema):
        raise MissingObject("schema")
    row = await _one(
        conn,
        "SELECT oid FROM pg_namespace WHERE nspname = %s AND nspname <> ALL(%s) "
        "AND NOT starts_with(nspname, 'pg_')",
        [schema, HIDDEN_SCHEMAS],
    )
    if row is None:
        raise MissingObject("schema")
    return int(row["oid"])


async def _ensure_privilege_role(
    conn: AdminConnection, role: str, catalog: str, object_oid: int, privilege: str
) -> None:
    """Create the role, or re-create it if it exists but the object's ACL does not name it.

    A stale role (its object dropped, the OID since reused) must not hand the new object
    to the keys that joined it for the old one.
    """
    acl_column = "relacl" if catalog == "pg_class" else "nspacl"
    row = await _one(
        conn,
        sql.SQL(
            "SELECT r.oid, EXISTS (SELECT 1 FROM {catalog} o, aclexplode(o.{acl}) a "
            "WHERE o.oid = %s AND a.grantee = r.oid AND a.privilege_type = %s) AS live "
            "FROM pg_roles r WHERE r.rolname = %s"
        ).format(catalog=sql.Identifier(catalog), acl=sql.Identifier(acl_column)).as_string(conn),
        [object_oid, privilege.upper(), role],
    )
    if row is not None and row["live"]:
        return
    if row is not None:
        await conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    await conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))


async def _join(conn: AdminConnection, privilege_role: str, key_role: str) -> None:
    await conn.execute(
        sql.SQL("GRANT {} TO {}").format(sql.Identifier(privilege_role), sql.Identifier(key_role))
    )


async def _grant_schema(
    conn: AdminConnection, user_id: str, key_role: str, schema: str, schema_oid: int,
    privilege: str,
) -> None:
    role = names.schema_privilege_role(user_id, schema_oid, privilege)
    await _ensure_privilege_role(conn, role, "pg_namespace", schema_oid, privilege)
    await conn.execute(
        sql.SQL("GRANT {} ON SCHEMA {} TO {}").format(
            sql.SQL(privilege.upper()), sql.Identifier(schema), sql.Identifier(role)
        )
    )
    await _join(conn, role, key_role)


async def _grant_owned_sequences(
    conn: AdminConnection, user_id: str, key_role: str, table_oid: int
) -> None:
    cur = await conn.execute(
        "SELECT s.oid, n.nspname, s.relname FROM pg_depend d "
        "JOIN pg_class s ON s.oid = d.objid JOIN pg_namespace n ON n.oid = s.relnamespace "
        "WHERE d.refobjid = %s AND d.classid = 'pg_class'::regclass "
        "AND d.refclassid = 'pg_class'::regclass AND s.relkind = 'S' AND d.deptype IN ('a', 'i')",
        [table_oid],
    )
    for seq in await cur.fetchall():
        role = names.sequence_privilege_role(user_id, seq["oid"])
        await _ensure_privilege_role(conn, role, "pg_class", seq["oid"], "usage")
        await conn.execute(
            sql.SQL("GRANT USAGE, SELECT ON SEQUENCE {} TO {}").format(
                sql.Identifier(seq["nspname"], seq["relname"]), sql.Identifier(role)
            )
        )
        await _join(conn, role, key_role)


async def apply_grants(
    conn: AdminConnection, user_id: str, key_role: str, plan: GrantsPlan
) -> None:
    """Give `key_role` what `plan` asks for. Raises MissingObject for unknown objects."""
    for table in plan.tables:
        found = await _resolve_table(conn, table.schema, table.name)
        for privilege in sorted(table.permissions):
            role = names.table_privilege_role(user_id, found["oid"], privilege)
            await _ensure_privilege_role(conn, role, "pg_class", found["oid"], privilege)
            await conn.execute(
                sql.SQL("GRANT {} ON TABLE {} TO {}").format(
                    sql.SQL(privilege.upper()), sql.Identifier(table.schema, table.name),
                    sql.Identifier(role),
                )
            )
            await _join(conn, role, key_role)
        await _grant_schema(conn, user_id, key_role, table.schema, found["schema_oid"], "usage")
        await _grant_owned_sequences(conn, user_id, key_role, found["oid"])
    for schema in plan.create_schemas:
        schema_oid = await _resolve_schema(conn, schema)
        await _grant_schema(conn, user_id, key_role, schema, schema_oid, "usage")
        await _grant_schema(conn, user_id, key_role, schema, schema_oid, "create")


async def drop_orphan_privilege_roles(conn: AdminConnection, user_id: str) -> int:
    """Privilege roles whose object is gone (dropped table or schema). Returns how many."""
    cur = await conn.execute(
        "SELECT r.rolname FROM pg_roles r WHERE starts_with(r.rolname, %s) "
        "AND r.rolname ~ %s "
        "AND NOT EXISTS (SELECT 1 FROM pg_class c, aclexplode(c.relacl) a "
        "                WHERE c.relacl IS NOT NULL AND a.grantee = r.oid) "
        "AND NOT EXISTS (SELECT 1 FROM pg_namespace n, aclexplode(n.nspacl) a "
        "                WHERE n.nspacl IS NOT NULL AND a.grantee = r.oid)",
        [names.user_role_prefix(user_id), PRIVILEGE_ROLE_PATTERN],
    )
    orphans = [row["rolname"] for row in await cur.fetchall()]
    for role in orphans:
        await conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    return len(orphans)


_HOLDERS = """
WITH keys AS (SELECT oid AS key_oid, rolname FROM pg_roles WHERE rolname = ANY(%(roles)s)),
holders AS (
    SELECT k.rolname, k.key_oid AS holder FROM keys k
    UNION ALL
    SELECT k.rolname, m.roleid FROM keys k
    JOIN pg_auth_members m ON m.member = k.key_oid
    JOIN pg_roles p ON p.oid = m.roleid AND p.rolname ~ %(pattern)s
)
"""

_TABLE_GRANTS = _HOLDERS + """
SELECT h.rolname AS role, n.nspname AS schema, c.relname AS name,
       array_agg(DISTINCT lower(a.privilege_type)) AS permissions, false AS owner
FROM holders h
JOIN pg_class c ON c.relacl IS NOT NULL AND c.relkind = ANY(%(relkinds)s)
JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL aclexplode(c.relacl) a
WHERE a.grantee = h.holder
GROUP BY 1, 2, 3
UNION ALL
SELECT k.rolname, n.nspname, c.relname, %(owner_privileges)s, true
FROM keys k JOIN pg_class c ON c.relowner = k.key_oid AND c.relkind = ANY(%(relkinds)s)
JOIN pg_namespace n ON n.oid = c.relnamespace
"""

_SCHEMA_GRANTS = _HOLDERS + """
SELECT h.rolname AS role, n.nspname AS name,
       array_agg(DISTINCT lower(a.privilege_type)) AS permissions
FROM holders h
JOIN pg_namespace n ON n.nspacl IS NOT NULL
CROSS JOIN LATERAL aclexplode(n.nspacl) a
WHERE a.grantee = h.holder
GROUP BY 1, 2
"""


async def read_live_grants(conn: AdminConnection, roles: Iterable[str]) -> dict[str, LiveGrants]:
    """What each key role holds of its own right now (not what it inherits)."""
    params = {
        "roles": list(roles), "pattern": PRIVILEGE_ROLE_PATTERN,
        "relkinds": GRANTABLE_RELKINDS, "owner_privileges": OWNER_PRIVILEGES,
    }
    result: dict[str, LiveGrants] = {role: LiveGrants() for role in params["roles"]}
    tables: dict[tuple[str, str, str], dict[str, Any]] = {}
    cur = await conn.execute(_TABLE_GRANTS, params)
    for row in await cur.fetchall():
        slot = (row["role"], row["schema"], row["name"])
        entry = tables.setdefault(slot, {"schema": row["schema"], "name": row["name"],
                                         "permissions": set(), "owner": False})
        entry["permissions"].update(row["permissions"])
        entry["owner"] = entry["owner"] or row["owner"]
    for (role, _, _), entry in sorted(tables.items()):
        entry["permissions"] = sorted(entry["permissions"])
        result[role].tables.append(entry)
    cur = await conn.execute(_SCHEMA_GRANTS, params)
    for row in sorted(await cur.fetchall(), key=lambda r: (r["role"], r["name"])):
        result[row["role"]].schemas.append(
            {"name": row["name"], "permissions": sorted(row["permissions"])}
        )
    return result
