"""Grants through privilege roles, and reading a key's grants back from live ACLs.

A key role is never granted a table directly: a table's ACL lives in its `pg_class` row and
holds only about 2,400 grantees. Each (object, privilege) that any key needs gets one
NOLOGIN privilege role named from the object's OID; keys join those roles.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from grantkey.db.cluster import AdminConnection
from grantkey.db.keys import storable
from grantkey.db.managers import PRIVILEGE_ROLE_PATTERN, Managers, acting_as, as_admin
from grantkey.domain import names
from grantkey.domain.grants import GrantsPlan
from grantkey.domain.keys import LiveGrants

GRANTABLE_RELKINDS = ["r", "v", "m", "f", "p"]
HIDDEN_SCHEMAS = ["pg_catalog", "information_schema", "grantkey_meta", "pg_toast"]
OWNER_PRIVILEGES = ["delete", "insert", "references", "select", "trigger", "truncate", "update"]


class MissingObject(Exception):
    """A granted table or schema does not exist in the user's database."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass(frozen=True)
class _Wanted:
    """One privilege role a key needs: on which object, which privilege, how to grant it."""

    role: str
    catalog: str  # "pg_class" or "pg_namespace"
    object_oid: int
    privilege: str  # as aclexplode names it: SELECT, USAGE, ...
    grant: sql.Composed


# (A multi-argument unnest() in FROM is syntax, not a function: it cannot be qualified and
# needs not be; the pinned search path keeps any other unnest out of sight.)
_RESOLVE_TABLES = """
SELECT w.position, c.oid, c.relnamespace AS schema_oid
FROM unnest(%(schemas)s::text[], %(names)s::text[]) WITH ORDINALITY AS w(schema, name, position)
LEFT JOIN pg_namespace n ON n.nspname OPERATOR(pg_catalog.=) w.schema
     AND n.nspname::text <> ALL(%(hidden)s::text[])
     AND NOT pg_catalog.starts_with(n.nspname::text, 'pg_'::text)
LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname OPERATOR(pg_catalog.=) w.name
     AND c.relkind::text = ANY(%(relkinds)s::text[])
ORDER BY w.position
"""
_RESOLVE_SCHEMAS = """
SELECT w.name, n.oid FROM pg_catalog.unnest(%(names)s::text[]) AS w(name)
LEFT JOIN pg_namespace n ON n.nspname OPERATOR(pg_catalog.=) w.name
     AND n.nspname::text <> ALL(%(hidden)s::text[])
     AND NOT pg_catalog.starts_with(n.nspname::text, 'pg_'::text)
"""
_OWNED_SEQUENCES = """
SELECT s.oid, n.nspname, s.relname FROM pg_depend d
JOIN pg_class s ON s.oid = d.objid JOIN pg_namespace n ON n.oid = s.relnamespace
WHERE d.refobjid = ANY(%s::oid[]) AND d.classid = 'pg_class'::regclass
  AND d.refclassid = 'pg_class'::regclass AND s.relkind = 'S' AND d.deptype IN ('a', 'i')
"""
# For each wanted role: does it exist, and does the object's live ACL still name it?
_LIVENESS = """
SELECT w.role, r.oid IS NOT NULL AS present,
       coalesce(EXISTS (SELECT 1 FROM pg_class c, aclexplode(c.relacl) a
                        WHERE w.catalog = 'pg_class' AND c.oid = w.object_oid
                          AND a.grantee = r.oid AND a.privilege_type = w.privilege)
             OR EXISTS (SELECT 1 FROM pg_namespace n, aclexplode(n.nspacl) a
                        WHERE w.catalog = 'pg_namespace' AND n.oid = w.object_oid
                          AND a.grantee = r.oid AND a.privilege_type = w.privilege)
             OR EXISTS (SELECT 1 FROM grantkey_meta.create_withheld h
                        WHERE w.catalog = 'pg_namespace' AND h.schema_oid = w.object_oid
                          AND h.grantee = r.oid AND w.privilege = 'CREATE'),
                false) AS live
FROM unnest(%(roles)s::text[], %(catalogs)s::text[], %(oids)s::oid[], %(privileges)s::text[])
     AS w(role, catalog, object_oid, privilege)
LEFT JOIN pg_roles r ON r.rolname OPERATOR(pg_catalog.=) w.role
"""


async def _resolve_tables(conn: AdminConnection, plan: GrantsPlan) -> list[dict[str, Any]]:
    if not all(storable(t.schema) and storable(t.name) for t in plan.tables):
        raise MissingObject("table")
    cur = await conn.execute(_RESOLVE_TABLES, {
        "schemas": [t.schema for t in plan.tables], "names": [t.name for t in plan.tables],
        "hidden": HIDDEN_SCHEMAS, "relkinds": GRANTABLE_RELKINDS})
    rows = await cur.fetchall()
    if any(row["oid"] is None for row in rows):
        raise MissingObject("table")
    return rows


async def _resolve_schemas(conn: AdminConnection, schemas: tuple[str, ...]) -> dict[str, int]:
    if not all(storable(name) for name in schemas):
        raise MissingObject("schema")
    cur = await conn.execute(_RESOLVE_SCHEMAS, {"names": list(schemas), "hidden": HIDDEN_SCHEMAS})
    found = {row["name"]: row["oid"] for row in await cur.fetchall()}
    if any(oid is None for oid in found.values()):
        raise MissingObject("schema")
    return found


def _schema_wanted(user_id: str, schema: str, schema_oid: int, privilege: str) -> _Wanted:
    role = names.schema_privilege_role(user_id, schema_oid, privilege)
    grant = sql.SQL("GRANT {} ON SCHEMA {} TO {}").format(
        sql.SQL(privilege.upper()), sql.Identifier(schema), sql.Identifier(role))
    return _Wanted(role, "pg_namespace", schema_oid, privilege.upper(), grant)


async def _wanted_roles(conn: AdminConnection, user_id: str, plan: GrantsPlan,
                        usage_schemas: Sequence[str] = ()) -> list[_Wanted]:
    wanted: dict[str, _Wanted] = {}
    if usage_schemas:
        cur = await conn.execute(
            "SELECT oid::int8 AS oid, nspname::text AS name FROM pg_catalog.pg_namespace "
            "WHERE nspname OPERATOR(pg_catalog.=) ANY (%s::text[])", [list(usage_schemas)])
        for found in await cur.fetchall():
            usage = _schema_wanted(user_id, found["name"], found["oid"], "usage")
            wanted[usage.role] = usage
    resolved = await _resolve_tables(conn, plan) if plan.tables else []
    for table, found in zip(plan.tables, resolved, strict=True):
        for privilege in sorted(table.permissions):
            role = names.table_privilege_role(user_id, found["oid"], privilege)
            grant = sql.SQL("GRANT {} ON TABLE {} TO {}").format(
                sql.SQL(privilege.upper()), sql.Identifier(table.schema, table.name),
                sql.Identifier(role))
            wanted[role] = _Wanted(role, "pg_class", found["oid"], privilege.upper(), grant)
        usage = _schema_wanted(user_id, table.schema, found["schema_oid"], "usage")
        wanted[usage.role] = usage
    if resolved:
        cur = await conn.execute(_OWNED_SEQUENCES, [[row["oid"] for row in resolved]])
        for seq in await cur.fetchall():
            role = names.sequence_privilege_role(user_id, seq["oid"])
            grant = sql.SQL("GRANT USAGE, SELECT ON SEQUENCE {} TO {}").format(
                sql.Identifier(seq["nspname"], seq["relname"]), sql.Identifier(role))
            wanted[role] = _Wanted(role, "pg_class", seq["oid"], "USAGE", grant)
    schemas = await _resolve_schemas(conn, plan.create_schemas) if plan.create_schemas else {}
    for schema, schema_oid in schemas.items():
        for privilege in ("usage", "create"):
            item = _schema_wanted(user_id, schema, schema_oid, privilege)
            wanted[item.role] = item
    return list(wanted.values())


async def apply_grants(
    conn: AdminConnection, user_id: str, key_role: str, plan: GrantsPlan,
    managers: Managers | None = None, usage_schemas: Sequence[str] = (),
) -> None:
    """Give `key_role` what `plan` asks for (and USAGE on `usage_schemas`: a named map's key,
    outside the reader role, needs PostGIS's). Raises MissingObject for unknown objects.
    With `managers`, the granter makes, drops and grants the privilege roles; the admin
    grants them the objects (as the owner role's heir).

    A privilege role that exists but that the object's live ACL no longer names (its object
    was dropped and the OID reused) is dropped, removing its stale members, and made anew:
    it must never hand a new object to keys that joined it for an old one.
    """
    wanted = await _wanted_roles(conn, user_id, plan, usage_schemas)
    if not wanted:
        return
    if any(w.catalog == "pg_namespace" for w in wanted):
        await _wait_for_quota_sweeper(conn)
    cur = await conn.execute(_LIVENESS, {
        "roles": [w.role for w in wanted], "catalogs": [w.catalog for w in wanted],
        "oids": [w.object_oid for w in wanted], "privileges": [w.privilege for w in wanted]})
    state = {row["role"]: row for row in await cur.fetchall()}
    for item in wanted:
        if state[item.role]["live"]:
            continue
        if managers is not None:
            await acting_as(conn, managers.granter)
        if state[item.role]["present"]:  # IF EXISTS: a cleanup may be dropping it too
            await conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(
                sql.Identifier(item.role)))
        await conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(item.role)))
        if managers is not None:
            await as_admin(conn)
        await _grant(conn, item)
    if managers is not None:
        await acting_as(conn, managers.granter)
    await conn.execute(sql.SQL("GRANT {} TO {}").format(
        sql.SQL(", ").join(sql.Identifier(w.role) for w in wanted), sql.Identifier(key_role)))
    if managers is not None:
        await as_admin(conn)


async def _grant(conn: AdminConnection, item: _Wanted, attempts: int = 5) -> None:
    """A schema's catalog row that a client updated in a transaction of its own (any role
    may run a REVOKE that revokes nothing) makes a concurrent GRANT fail with `tuple
    concurrently updated` once that transaction ends: grant again, on the new row."""
    for attempt in range(1, attempts + 1):
        try:
            async with conn.transaction():
                await conn.execute(item.grant)
            return
        except psycopg.errors.InternalError as error:
            if attempt == attempts or "concurrently updated" not in str(error):
                raise


async def _wait_for_quota_sweeper(conn: AdminConnection) -> None:
    """Schema grants while the storage quota's sweeper rewrites schema ACLs would fail
    (`tuple concurrently updated`): take its lock (the limit's row) first."""
    cur = await conn.execute(
        "SELECT pg_catalog.to_regclass('grantkey_meta.storage_quota') IS NOT NULL AS present")
    row = await cur.fetchone()
    if row is not None and row["present"]:
        await conn.execute("SELECT 1 FROM grantkey_meta.storage_quota FOR UPDATE")


async def orphan_privilege_roles(conn: AdminConnection, user_id: str) -> list[str]:
    """Privilege roles whose object is gone (dropped table or schema)."""
    cur = await conn.execute(
        "SELECT r.rolname FROM pg_roles r WHERE pg_catalog.starts_with(r.rolname::text, %s::text) "
        "AND r.rolname::text OPERATOR(pg_catalog.~) %s::text "
        "AND NOT EXISTS (SELECT 1 FROM pg_class c, aclexplode(c.relacl) a "
        "                WHERE c.relacl IS NOT NULL AND a.grantee = r.oid) "
        "AND NOT EXISTS (SELECT 1 FROM pg_namespace n, aclexplode(n.nspacl) a "
        "                WHERE n.nspacl IS NOT NULL AND a.grantee = r.oid) "
        # CREATE withheld by the storage quota (of a schema that still exists)
        "AND NOT EXISTS (SELECT 1 FROM grantkey_meta.create_withheld h "
        "                JOIN pg_namespace n ON n.oid = h.schema_oid WHERE h.grantee = r.oid)",
        [names.user_role_prefix(user_id), PRIVILEGE_ROLE_PATTERN],
    )
    return [row["rolname"] for row in await cur.fetchall()]


_HOLDERS = """
WITH keys AS (SELECT oid AS key_oid, rolname FROM pg_roles
              WHERE rolname OPERATOR(pg_catalog.=) ANY(%(roles)s::text[])),
holders AS (
    SELECT k.rolname, k.key_oid AS holder FROM keys k
    UNION ALL
    SELECT k.rolname, m.roleid FROM keys k
    JOIN pg_auth_members m ON m.member = k.key_oid
    JOIN pg_roles p ON p.oid = m.roleid AND p.rolname::text OPERATOR(pg_catalog.~) %(pattern)s::text
)
"""

_TABLE_GRANTS = _HOLDERS + """
SELECT h.rolname AS role, n.nspname AS schema, c.relname AS name,
       array_agg(DISTINCT pg_catalog.lower(a.privilege_type)) AS permissions, false AS owner
FROM holders h
JOIN pg_class c ON c.relacl IS NOT NULL AND c.relkind::text = ANY(%(relkinds)s::text[])
JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL aclexplode(c.relacl) a
WHERE a.grantee = h.holder
GROUP BY 1, 2, 3
UNION ALL
SELECT k.rolname, n.nspname, c.relname, %(owner_privileges)s, true
FROM keys k JOIN pg_class c ON c.relowner = k.key_oid AND c.relkind::text = ANY(%(relkinds)s::text[])
JOIN pg_namespace n ON n.oid = c.relnamespace
"""

# (CREATE withheld by the storage quota over its limit is still the key's.)
_SCHEMA_GRANTS = _HOLDERS + """
SELECT h.rolname AS role, g.nspname AS name,
       array_agg(DISTINCT pg_catalog.lower(g.privilege)) AS permissions
FROM holders h
JOIN (SELECT n.nspname, a.grantee, a.privilege_type AS privilege
        FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a
       WHERE n.nspacl IS NOT NULL
      UNION ALL
      SELECT n.nspname, w.grantee, 'CREATE'
        FROM grantkey_meta.create_withheld w JOIN pg_namespace n ON n.oid = w.schema_oid) g
  ON g.grantee = h.holder
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


TABLE_PRIVILEGES = ("select", "insert", "update", "delete")
_HELD_ON_RELATIONS = """
SELECT n.nspname::text AS schema, c.relname::text AS name,
       ARRAY(SELECT p FROM pg_catalog.unnest(%(privileges)s::text[]) AS p
             WHERE pg_catalog.has_table_privilege(%(role)s::text, c.oid, p)) AS held
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
 WHERE c.relname OPERATOR(pg_catalog.=) %(name)s::text AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
   AND n.nspname OPERATOR(pg_catalog.<>) ALL (ARRAY['pg_catalog', 'information_schema', 'grantkey_meta'])
   AND n.nspname NOT LIKE 'pg\\_%%'
 ORDER BY n.nspname OPERATOR(pg_catalog.<>) 'public', 1 LIMIT 5
"""
_HELD_ON_SCHEMAS = """
SELECT n.nspname::text AS schema, NULL::text AS name,
       ARRAY(SELECT p FROM pg_catalog.unnest(ARRAY['usage', 'create']) AS p
             WHERE pg_catalog.has_schema_privilege(%(role)s::text, n.oid, p)) AS held
  FROM pg_catalog.pg_namespace n WHERE n.nspname OPERATOR(pg_catalog.=) %(name)s::text
"""


async def held_privileges(conn: AdminConnection, role: str, kind: str,
                          name: str) -> list[tuple[str, str | None, list[str]]]:
    """What `role` holds (its own grants and what it inherits) on the relations named `name`
    in the user's schemas, or on the schema `name` (`kind` "schema"): (schema, relation or
    None, privileges). Built-in functions on OIDs only: no name is resolved, no tenant code
    runs."""
    query = _HELD_ON_SCHEMAS if kind == "schema" else _HELD_ON_RELATIONS
    cur = await conn.execute(query, {"role": role, "name": name,
                                     "privileges": list(TABLE_PRIVILEGES)})
    return [(row["schema"], row["name"], list(row["held"])) for row in await cur.fetchall()]
