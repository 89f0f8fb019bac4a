"""User rows in the metadata database, and each user's database and built-in roles."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from grantkey.db import revocations, sessions
from grantkey.db.bootstrap import hand_over_schema as bootstrap_hand_over
from grantkey.db.cluster import METADATA_DATABASE, AdminConnection, Cluster
from grantkey.domain import names
from grantkey.domain.keys import User
from grantkey.domain.names import USERNAME_PATTERN
from grantkey.domain.secrets_box import scram_verifier
from grantkey.errors import UserExists

LOGIN_ROLE_OPTIONS = sql.SQL(
    "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT"
)

KEYS_SCHEMA = "grantkey_meta"
KEYS_TABLE_DDL = """
CREATE TABLE grantkey_meta.api_keys (
    id             text PRIMARY KEY,
    name           text NOT NULL UNIQUE,
    type           text NOT NULL CHECK (type IN ('master', 'default', 'regular')),
    role           text NOT NULL UNIQUE,
    token_digest   bytea NOT NULL UNIQUE,
    sealed_token   bytea,
    apis           text[] NOT NULL,
    services       text[] NOT NULL DEFAULT '{}',
    table_metadata boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_keys_type_updated ON grantkey_meta.api_keys (type, updated_at);
CREATE UNIQUE INDEX api_keys_one_master ON grantkey_meta.api_keys (type)
    WHERE type IN ('master', 'default');
CREATE TABLE grantkey_meta.datasets (
    table_oid  oid PRIMARY KEY,
    privacy    text NOT NULL CHECK (privacy IN ('public', 'link')),
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""


def user_from_row(row: dict[str, Any]) -> User:
    return User(
        id=row["id"], username=row["username"], database=row["database"],
        owner_role=row["owner_role"], public_role=row["public_role"],
        created_at=row["created_at"], storage_quota=row.get("storage_quota") or "-1",
    )


async def find_user(conn: AdminConnection, username: str) -> User | None:
    if not USERNAME_PATTERN.fullmatch(username):
        return None  # also keeps NUL bytes and odd encodings away from PostgreSQL
    cur = await conn.execute(
        "SELECT * FROM public.users WHERE username = %s AND state = 'ready'", [username]
    )
    row = await cur.fetchone()
    return None if row is None else user_from_row(row)


async def find_user_by_id(conn: AdminConnection, user_id: str) -> User | None:
    cur = await conn.execute(
        "SELECT * FROM public.users WHERE id = %s AND state = 'ready'", [user_id])
    row = await cur.fetchone()
    return None if row is None else user_from_row(row)


async def list_users(conn: AdminConnection) -> list[User]:
    cur = await conn.execute("SELECT * FROM public.users WHERE state = 'ready' ORDER BY username")
    return [user_from_row(row) for row in await cur.fetchall()]


async def reserve_user(conn: AdminConnection, user: User) -> None:
    """UserExists if the name is taken."""
    try:
        await conn.execute(
            "INSERT INTO public.users (id, username, database, owner_role, public_role, state) "
            "VALUES (%s, %s, %s, %s, %s, 'creating')",
            [user.id, user.username, user.database, user.owner_role, user.public_role],
        )
    except psycopg.errors.UniqueViolation:
        raise UserExists(user.username) from None


async def create_builtin_roles(
    conn: AdminConnection, user: User, owner_password: str, public_password: str
) -> None:
    for role, password in ((user.owner_role, owner_password), (user.public_role, public_password)):
        await conn.execute(
            sql.SQL("CREATE ROLE {} {} PASSWORD {}").format(
                sql.Identifier(role), LOGIN_ROLE_OPTIONS,
                sql.Literal(scram_verifier(password)),
            )
        )
    await inherit_from(conn, user.owner_role, set_role=True)
    await inherit_from(conn, user.public_role)


async def is_superuser(conn: AdminConnection) -> bool:
    cur = await conn.execute("SELECT pg_catalog.current_setting('is_superuser') AS su")
    row = await cur.fetchone()
    return row is not None and row["su"] == "on"


_INHERIT_AND_SET_16 = sql.SQL("GRANT {} TO CURRENT_USER WITH INHERIT TRUE, SET TRUE")
_INHERIT_ONLY_16 = sql.SQL("GRANT {} TO CURRENT_USER WITH INHERIT TRUE, SET FALSE")


async def inherit_from(conn: AdminConnection, role: str, *, set_role: bool = False) -> None:
    """An admin that is not a superuser holds the privileges of each user's owner role
    (to work inside the user's database; `set_role` to create the database for it) and of
    its public role (so that removing a revoked role can revoke what the public role
    granted it: DROP OWNED revokes only grants by roles whose privileges the caller holds).
    PostgreSQL 16+ gives a role's creator only ADMIN OPTION; 15 inherits by default."""
    if await is_superuser(conn):
        return
    target = sql.Identifier(role)
    if conn.info.server_version >= 160000:
        grant = _INHERIT_AND_SET_16 if set_role else _INHERIT_ONLY_16
        await conn.execute(grant.format(target))
    else:
        await conn.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(target))


async def create_database(conn: AdminConnection, user: User,
                          template: str = "template0") -> None:
    """Runs outside a transaction (PostgreSQL's rule for CREATE DATABASE). `template`:
    template0, or grantkey's with PostGIS (`db.postgis.TEMPLATE`)."""
    await conn.execute(
        sql.SQL("CREATE DATABASE {} OWNER {} ENCODING 'UTF8' TEMPLATE {}").format(
            sql.Identifier(user.database), sql.Identifier(user.owner_role),
            sql.Identifier(template)
        )
    )


async def harden_database(conn: AdminConnection, user: User) -> None:
    """CONNECT and TEMPORARY for this user's roles only; `public` owned by the owner."""
    database = sql.Identifier(user.database)
    owner = sql.Identifier(user.owner_role)
    public = sql.Identifier(user.public_role)
    statements: list[sql.Composable] = [
        sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(database),
        sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}, {}").format(
            database, owner, public
        ),
        sql.SQL("ALTER SCHEMA public OWNER TO {}").format(owner),
        sql.SQL("REVOKE ALL ON SCHEMA public FROM PUBLIC"),
        sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(public),
        sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(KEYS_SCHEMA)),
        sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(sql.Identifier(KEYS_SCHEMA)),
    ]
    for statement in statements:
        await conn.execute(statement.as_string(conn))
    await conn.execute(KEYS_TABLE_DDL)


_GRANT_OWNER_16 = sql.SQL("GRANT {} TO {} WITH ADMIN TRUE, INHERIT TRUE, SET FALSE")
_GRANT_PUBLIC_16 = sql.SQL("GRANT {} TO {} WITH ADMIN TRUE, INHERIT TRUE, SET FALSE")
_GRANT_ADMIN_16 = sql.SQL("GRANT {} TO {} WITH ADMIN TRUE, INHERIT FALSE, SET FALSE")


async def hand_over_user_database(su: AdminConnection, user_id: str, routine: str) -> None:
    """As the superuser, for a user database an earlier release made as the superuser: the
    routine admin gets `grantkey_meta`, ADMIN OPTION on every role of the user (PostgreSQL
    16+ lets a non-superuser manage only those), and INHERIT on the owner role (not SET: see
    `db.managers`)."""
    if not await is_superuser(su) or routine == su.info.user:
        return
    await bootstrap_hand_over(su, KEYS_SCHEMA, routine)
    cur = await su.execute(
        "SELECT rolname::text AS rolname FROM pg_catalog.pg_roles "
        "WHERE pg_catalog.starts_with(rolname::text, %s::text)", [names.user_role_prefix(user_id)])
    target = sql.Identifier(routine)
    for row in await cur.fetchall():
        role = row["rolname"]
        owner = role == names.owner_role(user_id)
        public = role == names.public_role(user_id)
        if su.info.server_version >= 160000:
            grant = _GRANT_OWNER_16 if owner else _GRANT_PUBLIC_16 if public else _GRANT_ADMIN_16
            await su.execute(grant.format(sql.Identifier(role), target))
        elif owner or public:
            await su.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), target))


async def mark_ready(conn: AdminConnection, user_id: str, schema_version: int) -> None:
    await conn.execute("UPDATE public.users SET state = 'ready', schema_version = %s "
                       "WHERE id = %s", [schema_version, user_id])


async def users_behind(conn: AdminConnection, latest: int) -> list[dict[str, Any]]:
    """Ready users whose database has not had every migration yet."""
    cur = await conn.execute(
        "SELECT id, username, database FROM public.users WHERE state = 'ready' "
        "AND schema_version < %s ORDER BY username", [latest])
    return list(await cur.fetchall())


async def users_with_other_quota(conn: AdminConnection, size: str,
                                 version: int) -> list[dict[str, Any]]:
    """Ready users whose database has the quota triggers (user migration `version`) and
    a storage quota other than `size`."""
    cur = await conn.execute(
        "SELECT id, username, database FROM public.users WHERE state = 'ready' "
        "AND schema_version >= %s AND storage_quota <> %s ORDER BY username", [version, size])
    return list(await cur.fetchall())


async def record_storage_quota(conn: AdminConnection, user_id: str, size: str) -> None:
    await conn.execute("UPDATE public.users SET storage_quota = %s WHERE id = %s",
                       [size, user_id])


async def set_schema_version(conn: AdminConnection, user_id: str, version: int) -> None:
    await conn.execute("UPDATE public.users SET schema_version = %s WHERE id = %s",
                       [version, user_id])


async def mark_deleting(conn: AdminConnection, user_id: str) -> None:
    await conn.execute("UPDATE public.users SET state = 'deleting' WHERE id = %s", [user_id])


DROP_ATTEMPTS = 3


async def drop_user_everywhere(cluster: Cluster, user_id: str, database: str) -> None:
    """Remove a user's database, every role named for it, and its row. Idempotent. The row
    goes last, only once every role is gone, so a failure is retried at start-up."""
    await cluster.forget_database(database)
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
    async with cluster.autocommit() as conn:
        for attempt in range(1, DROP_ATTEMPTS + 1):
            try:
                await conn.execute(drop)
                break
            except psycopg.errors.ObjectInUse:
                # FORCE waits 5 s for the sessions it ended to exit; a busy machine's
                # backend (dropping a session's many temporary tables) may take longer
                if attempt == DROP_ATTEMPTS:
                    raise
    await drop_user_roles(cluster, user_id)
    async with cluster.autocommit() as conn:
        await conn.execute("DELETE FROM public.users WHERE id = %s", [user_id])


async def drop_user_roles(cluster: Cluster, user_id: str) -> None:
    """Every role named for the user: logins stopped, sessions ended, what other databases
    grant them dropped (another tenant may have granted them something), then the role.

    In bulk as the superuser where one is at hand (the CLI and `serve`'s start-up repair:
    the embedded cluster's, or GRANTKEY_SUPERUSER_URL): an admin that is not a superuser
    pays, for each DROP ROLE, a walk of every role it reaches (db.managers), so a user with
    N keys would cost N² catalog lookups. Else one role at a time, as the admin."""
    if await _drop_user_roles_as_superuser(cluster, user_id):
        return
    async with cluster.autocommit() as conn:
        cur = await conn.execute(
            "SELECT rolname::text AS rolname, oid FROM pg_catalog.pg_roles "
            "WHERE pg_catalog.starts_with(rolname::text, %s::text)", [names.user_role_prefix(user_id)])
        # the manager roles last: they granted memberships in the others (db.managers)
        managers = (names.maker_role(user_id), names.granter_role(user_id))
        roles = sorted(((row["rolname"], int(row["oid"])) for row in await cur.fetchall()),
                       key=lambda item: item[0] in managers)
        for role, oid in roles:
            await conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)))
            await revocations.terminate_sessions(conn, oid)
    for role, oid in roles:
        await revocations.drop_role_everywhere(cluster, role, oid)


DROP_BATCH = 200  # roles per DROP OWNED / DROP ROLE statement (each takes a lock per role)


def _batches(roles: list[str]) -> list[list[str]]:
    return [roles[i:i + DROP_BATCH] for i in range(0, len(roles), DROP_BATCH)]


def _role_list(roles: list[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(role) for role in roles)


async def _drop_user_roles_as_superuser(cluster: Cluster, user_id: str) -> bool:
    """`drop_user_roles` in a few statements as the superuser (no ADMIN OPTION walks).
    False, having done nothing, where no superuser is at hand."""
    async with cluster.superuser_session(METADATA_DATABASE) as su:
        if not await is_superuser(su):
            return False
        cur = await su.execute(
            "SELECT rolname::text AS rolname, oid FROM pg_catalog.pg_roles "
            "WHERE pg_catalog.starts_with(rolname::text, %s::text)", [names.user_role_prefix(user_id)])
        found = {row["rolname"]: int(row["oid"]) for row in await cur.fetchall()}
        for role in found:
            await su.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)))
    if not found:
        return True
    oids = list(found.values())
    async with cluster.superuser_session(METADATA_DATABASE) as su:  # once NOLOGIN is committed
        await sessions.terminate_role_sessions(su, oids)
        cur = await su.execute(revocations.DATABASES_NAMING, [oids])
        databases = [row["datname"] for row in await cur.fetchall()]
    # the manager roles last: they granted memberships in the others (db.managers)
    managers = (names.maker_role(user_id), names.granter_role(user_id))
    roles = sorted(found, key=lambda role: (role in managers, role))
    for database in databases:
        for batch in _batches(roles):
            async with cluster.superuser_session(database) as su:
                await revocations.bounded_cleanup_wait(su)
                await su.execute(sql.SQL("DROP OWNED BY {}").format(_role_list(batch)))
    others = [role for role in roles if role not in managers]
    for batch in [*_batches(others), [role for role in roles if role in managers]]:
        if batch:
            async with cluster.superuser_session(METADATA_DATABASE) as su:
                await su.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(_role_list(batch)))
    return True


async def owner_roles(conn: AdminConnection) -> dict[str, str]:
    """user id → owner role, for every ready user."""
    cur = await conn.execute("SELECT id, owner_role FROM public.users WHERE state = 'ready'")
    return {row["id"]: row["owner_role"] for row in await cur.fetchall()}
