"""Per-user manager roles: how an admin that is not a superuser manages key roles cheaply.

PostgreSQL 16+ checks a non-superuser's right to grant, alter or drop a role (ADMIN OPTION)
by walking every role the acting role is a member of, through every membership, with no
cache (`roles_is_member_of` for `is_admin_of_role`); and each change to `pg_auth_members`
empties the catalog cache that walk reads. A `CREATEROLE` role becomes an ADMIN member of
each role it creates, and the admin is also a member of each owner role, itself a member of
every key role: a walk from the admin visits every key role of every user, one catalog
lookup each. Making keys that way costs time in proportion to the roles already there.

So key roles are made by roles whose own membership lists stay short:

- the *maker* (`gk_<user>_maker`, NOLOGIN, CREATEROLE, NOINHERIT) runs
  `CREATE ROLE <key> … ROLE <owner>`: that clause needs no ADMIN check, only the maker's
  own grants (it is an ADMIN member of the keys it made, but inherits nothing);
- the *granter* (`gk_<user>_granter`, NOLOGIN, CREATEROLE, NOINHERIT) holds ADMIN OPTION
  on the user's reader role and creates the privilege roles, so granting those to a key
  walks only them.

The admin reaches both with SET (never INHERIT), and holds the owner role with INHERIT but
not SET once the user's database exists, so that `SET ROLE` (which walks the SET
memberships) never passes through the owner to the keys. Everything else (regenerating,
revoking, dropping a key role) is still done as the admin, which is an ADMIN member of
each key role through the maker.

A superuser admin, or PostgreSQL 15 (where CREATEROLE administers every role without a
membership), does not use them.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from grantkey.db.cluster import AdminConnection
from grantkey.domain import names

PRIVILEGE_ROLE_PATTERN = names.PRIVILEGE_ROLE_PATTERN  # the names of privilege roles


@dataclass(frozen=True)
class Managers:
    maker: str
    granter: str


_STATE = """
SELECT pg_catalog.current_setting('is_superuser') AS su,
       (SELECT pg_catalog.count(*) FROM pg_catalog.pg_roles
         WHERE rolname OPERATOR(pg_catalog.=) ANY(%(roles)s::text[])) AS present
"""


async def managers_for(conn: AdminConnection, user_id: str, owner_role: str) -> Managers | None:
    """The user's manager roles, made first if missing; None where they are not used."""
    if conn.info.server_version < 160000:
        return None
    managers = Managers(names.maker_role(user_id), names.granter_role(user_id))
    cur = await conn.execute(_STATE, {"roles": [managers.maker, managers.granter]})
    row = await cur.fetchone()
    assert row is not None
    if row["su"] == "on":
        return None
    if int(row["present"]) < 2:
        await ensure_managers(conn, user_id, owner_role)
    return managers


async def ensure_managers(conn: AdminConnection, user_id: str, owner_role: str) -> None:
    """As the admin (not a superuser, PostgreSQL 16+), in the user's database: make the
    maker and the granter, give the granter ADMIN OPTION on the reader role and on every
    privilege role there is, and keep SET on the owner role from the admin. Idempotent."""
    maker, granter = names.maker_role(user_id), names.granter_role(user_id)
    for role in (maker, granter):
        cur = await conn.execute("SELECT 1 FROM pg_catalog.pg_roles "
                                 "WHERE rolname OPERATOR(pg_catalog.=) %s::text", [role])
        if await cur.fetchone() is None:
            await conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN NOINHERIT CREATEROLE").format(
                sql.Identifier(role)))
        await conn.execute(sql.SQL(
            "GRANT {} TO CURRENT_USER WITH INHERIT FALSE, SET TRUE").format(sql.Identifier(role)))
    cur = await conn.execute(
        "SELECT rolname::text AS rolname FROM pg_catalog.pg_roles "
        "WHERE rolname OPERATOR(pg_catalog.=) %(reader)s::text "
        "OR (pg_catalog.starts_with(rolname::text, %(prefix)s::text) "
        "    AND rolname::text OPERATOR(pg_catalog.~) %(pattern)s::text)",
        {"reader": names.reader_role(user_id), "prefix": names.user_role_prefix(user_id),
         "pattern": PRIVILEGE_ROLE_PATTERN})
    for row in await cur.fetchall():
        await conn.execute(sql.SQL(
            "GRANT {} TO {} WITH ADMIN TRUE, INHERIT FALSE, SET FALSE").format(
                sql.Identifier(row["rolname"]), sql.Identifier(granter)))
    await conn.execute(sql.SQL("GRANT {} TO CURRENT_USER WITH INHERIT TRUE, SET FALSE").format(
        sql.Identifier(owner_role)))


async def acting_as(conn: AdminConnection, role: str) -> None:
    """For the rest of the transaction (or until `as_admin`), act as a manager role."""
    await conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))


async def as_admin(conn: AdminConnection) -> None:
    await conn.execute("RESET ROLE")
