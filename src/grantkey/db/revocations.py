"""Revoking a key role, and removing it afterwards without raising anyone's privileges.

Revocation is decided in one transaction on the metadata database, which no tenant can
reach: the role loses LOGIN and its password (role attributes are cluster-wide), a row in
`public.revocations` records the cleanup still owed, and a NOTIFY tells every grantkey
process at commit. Nothing there waits on a lock a tenant can take.

Removing the role afterwards is best effort and idempotent (`remove_key_role`), retried at
start-up while its row remains. It never hands a key's code to anyone: the key's
functions, procedures, aggregates, operators, views, materialized views, and the rules and
triggers on its tables are dropped; its tables, sequences and types go to the user's owner
role (CARTO keeps the tables a key created), minus the grants the key made on them to
PUBLIC or to roles outside its user; the privileges granted *to* the role are dropped in
every database that names it.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from grantkey.db import sessions
from grantkey.db.cluster import AdminConnection, Cluster
from grantkey.domain import names

REVOCATIONS_DDL = """
CREATE TABLE IF NOT EXISTS public.revocations (
    role      text PRIMARY KEY,
    user_id   text NOT NULL,
    database  text NOT NULL,
    role_oid  oid NOT NULL,
    since     timestamptz NOT NULL DEFAULT now()
)
"""
# Token digests whose revocation was decided while the key's row may still name them (a
# crash between the decision and the row's update): never restored by the role repair.
REVOKED_TOKENS_DDL = """
CREATE TABLE IF NOT EXISTS public.revoked_tokens (
    user_id      text NOT NULL,
    token_digest bytea NOT NULL,
    since        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, token_digest)
)
"""
KEYS_LOCK_CLASS = 0x676C  # the first key of each user's key-management advisory lock
CLEANUP_LOCK_TIMEOUT = "5s"
DECIDE_LOCK_TIMEOUT = "1s"


async def lock_user_keys(meta: AdminConnection, user_id: str) -> None:
    """Serialise one user's key changes, on the metadata database (clients cannot reach
    it, so they cannot hold this lock)."""
    await meta.execute("SELECT pg_catalog.pg_advisory_xact_lock(%s, pg_catalog.hashtext(%s::text))",
                       [KEYS_LOCK_CLASS, user_id])


async def role_oid(conn: AdminConnection, role: str) -> int:
    cur = await conn.execute(
        "SELECT oid FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) %s::text", [role])
    row = await cur.fetchone()
    return int(row["oid"]) if row else 0


async def disable_login(meta: AdminConnection, role: str) -> None:
    await meta.execute(sql.SQL("ALTER ROLE {} NOLOGIN PASSWORD NULL").format(sql.Identifier(role)))


async def bounded_lock_wait(meta: AdminConnection) -> None:
    await meta.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
        sql.Literal(DECIDE_LOCK_TIMEOUT)))


async def leave_every_role(meta: AdminConnection, role: str, oid: int) -> None:
    """The role leaves its privilege roles and the user's public role (memberships are
    cluster-wide: this runs on the metadata database, out of tenants' reach)."""
    target = sql.Identifier(role)
    if meta.info.server_version < 160000 or await _is_superuser(meta):
        cur = await meta.execute(
            "SELECT DISTINCT r.rolname::text AS rolname FROM pg_catalog.pg_auth_members m "
            "JOIN pg_catalog.pg_roles r ON r.oid = m.roleid WHERE m.member = %s::oid", [oid])
        groups = [row["rolname"] for row in await cur.fetchall()]
        if groups:
            await meta.execute(sql.SQL("REVOKE {} FROM {} CASCADE").format(
                sql.SQL(", ").join(sql.Identifier(g) for g in groups), target))
        return
    cur = await meta.execute(
        "SELECT r.rolname::text AS rolname, g.rolname::text AS grantor, "
        "       g.rolname OPERATOR(pg_catalog.=) CURRENT_USER AS mine, "
        "       g.oid IS NOT NULL AND pg_catalog.pg_has_role(g.oid, 'SET') AS settable "
        "FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles r ON r.oid = m.roleid "
        "LEFT JOIN pg_catalog.pg_roles g ON g.oid = m.grantor WHERE m.member = %s::oid", [oid])
    rows = await cur.fetchall()
    # A non-superuser revokes what it granted, and what a role it can SET ROLE to granted
    # (the user's granter, see `managers`), each as that grantor.
    by_grantor: dict[tuple[str | None, bool, bool], list[str]] = {}
    for row in rows:
        key = (row["grantor"], bool(row["mine"]), bool(row["settable"]))
        by_grantor.setdefault(key, []).append(row["rolname"])
    for (grantor, mine, settable), groups in sorted(by_grantor.items(), key=lambda i: str(i[0])):
        revoke = sql.SQL("REVOKE {} FROM {}").format(
            sql.SQL(", ").join(sql.Identifier(g) for g in groups), target)
        if mine or (settable and grantor is not None):
            if not mine and grantor is not None:
                await meta.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(grantor)))
            await meta.execute(sql.SQL("{} GRANTED BY CURRENT_USER CASCADE").format(revoke))
            if not mine:
                await meta.execute("RESET ROLE")
        else:
            await meta.execute(sql.SQL("{} CASCADE").format(revoke))


async def _is_superuser(conn: AdminConnection) -> bool:
    cur = await conn.execute("SELECT pg_catalog.current_setting('is_superuser') AS su")
    row = await cur.fetchone()
    return row is not None and row["su"] == "on"


async def record_pending(meta: AdminConnection, role: str, user_id: str, database: str,
                         oid: int) -> None:
    await meta.execute(
        "INSERT INTO public.revocations (role, user_id, database, role_oid) "
        "VALUES (%s, %s, %s, %s) ON CONFLICT (role) DO NOTHING", [role, user_id, database, oid])


async def tombstone(meta: AdminConnection, user_id: str, token_digest: bytes) -> None:
    await meta.execute(
        "INSERT INTO public.revoked_tokens (user_id, token_digest) VALUES (%s, %s) "
        "ON CONFLICT DO NOTHING", [user_id, token_digest])


async def is_tombstoned(meta: AdminConnection, user_id: str, token_digest: bytes) -> bool:
    cur = await meta.execute("SELECT 1 FROM public.revoked_tokens WHERE user_id = %s "
                             "AND token_digest = %s", [user_id, token_digest])
    return await cur.fetchone() is not None


async def forget_tombstone(meta: AdminConnection, user_id: str, token_digest: bytes) -> None:
    """Once the key's row no longer names the digest, nothing can bring the token back."""
    await meta.execute("DELETE FROM public.revoked_tokens WHERE user_id = %s "
                       "AND token_digest = %s", [user_id, token_digest])


async def pending(meta: AdminConnection, older_than: float = 0) -> list[dict[str, object]]:
    cur = await meta.execute(
        "SELECT role, user_id, database, role_oid FROM public.revocations "
        "WHERE since <= pg_catalog.now() - pg_catalog.make_interval(secs => %s) ORDER BY since",
        [older_than])
    return list(await cur.fetchall())


RETRY_LOCK = (0x676B, 0x7276)  # ("gk", "rv"): one process at a time retries cleanups


async def try_retry_lock(conn: AdminConnection) -> bool:
    cur = await conn.execute("SELECT pg_catalog.pg_try_advisory_lock(%s, %s) AS got",
                             list(RETRY_LOCK))
    row = await cur.fetchone()
    return bool(row and row["got"])


async def release_retry_lock(conn: AdminConnection) -> None:
    await conn.execute("SELECT pg_catalog.pg_advisory_unlock(%s, %s)", list(RETRY_LOCK))


async def forget_pending(meta: AdminConnection, role: str) -> None:
    await meta.execute("DELETE FROM public.revocations WHERE role = %s", [role])


async def terminate_sessions(conn: AdminConnection, oid: int,
                             started_before: float | None = None) -> None:
    """By OID: once a role is dropped, pg_stat_activity no longer shows its name."""
    await sessions.terminate_role_sessions(conn, [oid], started_before)


# Objects a key owns in its own database that are code someone else could run, and how to
# drop each (the identity comes from PostgreSQL's own reg* output, quoted by PostgreSQL).
_KEY_CODE = """
SELECT 'ROUTINE' AS kind, p.oid::pg_catalog.regprocedure::text AS identity
  FROM pg_catalog.pg_proc p WHERE p.proowner = %(oid)s::oid AND p.prokind <> 'a'
UNION ALL
SELECT 'AGGREGATE', p.oid::pg_catalog.regprocedure::text
  FROM pg_catalog.pg_proc p WHERE p.proowner = %(oid)s::oid AND p.prokind = 'a'
UNION ALL
SELECT 'OPERATOR', o.oid::pg_catalog.regoperator::text
  FROM pg_catalog.pg_operator o WHERE o.oprowner = %(oid)s::oid
UNION ALL
SELECT CASE c.relkind WHEN 'v' THEN 'VIEW' ELSE 'MATERIALIZED VIEW' END,
       c.oid::pg_catalog.regclass::text
  FROM pg_catalog.pg_class c WHERE c.relowner = %(oid)s::oid AND c.relkind IN ('v', 'm')
"""
_KEY_TABLE_CODE = """
SELECT 'RULE' AS kind, r.rulename::text AS name, c.oid::pg_catalog.regclass::text AS rel
  FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
 WHERE c.relowner = %(oid)s::oid AND r.rulename OPERATOR(pg_catalog.<>) '_RETURN'::name
UNION ALL
SELECT 'TRIGGER', t.tgname::text, c.oid::pg_catalog.regclass::text
  FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
  JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
  JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
 WHERE c.relowner = %(oid)s::oid AND NOT t.tgisinternal
   AND n.nspname OPERATOR(pg_catalog.<>) 'grantkey_meta'::name  -- the storage quota's
"""
# Who besides PUBLIC holds grants, table-wide or on a column, on the key's own relations:
# roles that are not this user's.
_FOREIGN_GRANTEES = """
SELECT DISTINCT c.oid::pg_catalog.regclass::text AS rel, r.rolname::text AS rolname
  FROM pg_catalog.pg_class c
  LEFT JOIN pg_catalog.pg_attribute att ON att.attrelid = c.oid AND att.attacl IS NOT NULL
  CROSS JOIN LATERAL pg_catalog.aclexplode(
      pg_catalog.array_cat(c.relacl, att.attacl)) a
  JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
 WHERE c.relowner = %(oid)s::oid
   AND NOT pg_catalog.starts_with(r.rolname::text, %(prefix)s::text)
"""
_OWNED_RELATIONS = """
SELECT c.oid::pg_catalog.regclass::text AS rel FROM pg_catalog.pg_class c
 WHERE c.relowner = %(oid)s::oid AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
"""


async def drop_key_code(conn: AdminConnection, oid: int) -> None:
    """Drop every piece of code the role owns or attached to its tables (CASCADE: what
    depends on it, a trigger, an index or a column default calling it, goes too)."""
    await bounded_cleanup_wait(conn)
    cur = await conn.execute(_KEY_TABLE_CODE, {"oid": oid})
    for row in await cur.fetchall():
        await conn.execute(sql.SQL("DROP {} IF EXISTS {} ON {} CASCADE").format(
            sql.SQL(row["kind"]), sql.Identifier(row["name"]), sql.SQL(row["rel"])))
    dropped: set[tuple[str, str]] = set()
    while True:  # dropping one thing can cascade to the next: re-read until none is left
        cur = await conn.execute(_KEY_CODE, {"oid": oid})
        rows = await cur.fetchall()
        if not rows:
            return
        target = (str(rows[0]["kind"]), str(rows[0]["identity"]))
        if target in dropped:  # IF EXISTS found nothing under that name: never loop on it
            raise psycopg.errors.ObjectInUse(f"could not drop {target[0]} {target[1]}")
        dropped.add(target)
        await conn.execute(sql.SQL("DROP {} IF EXISTS {} CASCADE").format(
            sql.SQL(target[0]), sql.SQL(target[1])))


async def revoke_foreign_grants(conn: AdminConnection, oid: int, user_prefix: str) -> None:
    """No grant the key made on what it owned survives to PUBLIC or to another user's
    roles (a table-level REVOKE ALL takes the column grants with it)."""
    await bounded_cleanup_wait(conn)
    cur = await conn.execute(_OWNED_RELATIONS, {"oid": oid})
    for row in await cur.fetchall():
        await conn.execute(sql.SQL("REVOKE ALL ON {} FROM PUBLIC CASCADE").format(
            sql.SQL(row["rel"])))
    cur = await conn.execute(_FOREIGN_GRANTEES, {"oid": oid, "prefix": user_prefix})
    for row in await cur.fetchall():
        await conn.execute(sql.SQL("REVOKE ALL ON {} FROM {} CASCADE").format(
            sql.SQL(row["rel"]), sql.Identifier(row["rolname"])))


async def bounded_cleanup_wait(conn: AdminConnection) -> None:
    await conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
        sql.Literal(CLEANUP_LOCK_TIMEOUT)))


async def hand_over_and_drop_owned(conn: AdminConnection, role: str, owner_role: str) -> None:
    """What is left (tables, sequences, types) goes to the owner; privileges held by the
    role in this database are dropped."""
    ident = sql.Identifier(role)
    await bounded_cleanup_wait(conn)
    await conn.execute(sql.SQL("REASSIGN OWNED BY {} TO {}").format(
        ident, sql.Identifier(owner_role)))
    await drop_owned(conn, role)


# Every database whose objects or ACLs name the roles (pg_shdepend), connectable. Grants on
# shared objects (a database, a tablespace: another tenant can `GRANT CONNECT ON DATABASE`
# its own database to any role) are recorded with dbid 0: `DROP OWNED` in any database
# revokes those, so they name the database this runs in (the metadata database).
DATABASES_NAMING = """
SELECT DISTINCT COALESCE(d.datname, pg_catalog.current_database())::text AS datname
  FROM pg_catalog.pg_shdepend s LEFT JOIN pg_catalog.pg_database d ON d.oid = s.dbid
 WHERE s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass
   AND s.refobjid = ANY(%s::oid[]) AND (s.dbid = 0 OR d.datallowconn)
"""


async def databases_naming(conn: AdminConnection, oid: int) -> list[str]:
    """Every database where `DROP OWNED BY` the role has something to do."""
    cur = await conn.execute(DATABASES_NAMING, [[oid]])
    return [row["datname"] for row in await cur.fetchall()]


async def drop_owned(conn: AdminConnection, role: str) -> None:
    await bounded_cleanup_wait(conn)
    # CREATE the storage quota withholds is put back first, so DROP OWNED revokes it
    cur = await conn.execute(
        "SELECT pg_catalog.to_regprocedure('grantkey_meta.return_withheld(oid)') IS NOT NULL "
        "AS present")
    row = await cur.fetchone()
    if row is not None and row["present"]:
        await conn.execute("SELECT grantkey_meta.return_withheld(%s::pg_catalog.regrole)",
                           [role])
    await conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))


async def take_privileges_of(meta: AdminConnection, role: str) -> None:
    """`DROP OWNED BY` needs the privileges of the role. An admin that is not a superuser
    has them for key roles (through the owner role) but not for the reader and manager
    roles it holds only with ADMIN OPTION (or SET): it grants itself INHERIT on such a role
    first; dropping the role ends that membership."""
    cur = await meta.execute("SELECT pg_catalog.pg_has_role(%s::text, 'USAGE') AS has",
                             [role])
    row = await cur.fetchone()
    if row is not None and row["has"]:
        return
    grant = ("GRANT {} TO CURRENT_USER WITH INHERIT TRUE"
             if meta.info.server_version >= 160000 else "GRANT {} TO CURRENT_USER")
    await meta.execute(sql.SQL(grant).format(sql.Identifier(role)))


async def drop_role(conn: AdminConnection, role: str) -> None:
    await conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


async def drop_role_everywhere(cluster: Cluster, role: str, oid: int) -> None:
    """Drop what the role holds in every database that names it, then the role."""
    async with cluster.metadata() as meta:
        databases = await databases_naming(meta, oid)
        if databases:
            await take_privileges_of(meta, role)
    for database in databases:
        async with cluster.autocommit(database) as conn, conn.transaction():
            await drop_owned(conn, role)
    async with cluster.metadata() as meta:
        await drop_role(meta, role)


async def can_log_in(conn: AdminConnection, role: str) -> bool:
    cur = await conn.execute(
        "SELECT rolcanlogin FROM pg_catalog.pg_roles "
        "WHERE rolname OPERATOR(pg_catalog.=) %s::text", [role])
    row = await cur.fetchone()
    return bool(row and row["rolcanlogin"])


async def reset_role_settings(conn: AdminConnection, role: str) -> None:
    """Undo every `ALTER ROLE … [IN DATABASE …] SET` on the role."""
    cur = await conn.execute(
        "SELECT d.datname::text AS datname FROM pg_catalog.pg_db_role_setting s "
        "LEFT JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase "
        "WHERE s.setrole = (SELECT oid FROM pg_catalog.pg_roles "
        "                   WHERE rolname OPERATOR(pg_catalog.=) %s::text)", [role])
    for row in await cur.fetchall():
        if row["datname"] is None:
            await conn.execute(sql.SQL("ALTER ROLE {} RESET ALL").format(sql.Identifier(role)))
        else:
            await conn.execute(sql.SQL("ALTER ROLE {} IN DATABASE {} RESET ALL").format(
                sql.Identifier(role), sql.Identifier(row["datname"])))


async def roles_with_settings(conn: AdminConnection) -> list[str]:
    """grantkey's roles that carry `ALTER ROLE … SET` defaults."""
    cur = await conn.execute(
        "SELECT DISTINCT r.rolname::text AS rolname FROM pg_catalog.pg_db_role_setting s "
        "JOIN pg_catalog.pg_roles r ON r.oid = s.setrole "
        "WHERE pg_catalog.starts_with(r.rolname::text, %s::text)", [names.NAME_PREFIX])
    return [row["rolname"] for row in await cur.fetchall()]


async def privilege_role_oids(conn: AdminConnection, user_prefix: str, pattern: str) -> list[int]:
    cur = await conn.execute(
        "SELECT oid FROM pg_catalog.pg_roles "
        "WHERE pg_catalog.starts_with(rolname::text, %s::text) "
        "AND rolname::text OPERATOR(pg_catalog.~) %s::text", [user_prefix, pattern])
    return [int(row["oid"]) for row in await cur.fetchall()]
