"""Start-up repair: finish or undo what a crash left half-done.

Key changes are single transactions inside a user's database and need no repair. User
creation and deletion span CREATE/DROP DATABASE, which cannot run in a transaction: a
user row stays in state `creating` or `deleting` until the last step, so at start-up
every such row whose creator is gone (its advisory lock is free) is removed with all it
owns. Databases and roles named for an id that has no user row are dropped too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from psycopg import sql

from grantkey.db import users as user_store
from grantkey.db.cluster import Cluster

USER_LOCK_CLASS = 0x676B  # "gk": the first key of the advisory lock held while provisioning
_DATABASE = re.compile(r"gk_([0-9a-f]{16})")
_ROLE = re.compile(r"gk_([0-9a-f]{16})_.*")


@dataclass
class Repair:
    unfinished_users: list[str] = field(default_factory=list)
    orphan_databases: list[str] = field(default_factory=list)
    orphan_role_owners: list[str] = field(default_factory=list)

    @property
    def anything(self) -> bool:
        return bool(self.unfinished_users or self.orphan_databases or self.orphan_role_owners)


async def reconcile(cluster: Cluster) -> Repair:
    repair = Repair()
    async with cluster.autocommit() as conn:
        cur = await conn.execute("SELECT id, database FROM users WHERE state <> 'ready'")
        pending = await cur.fetchall()
        cur = await conn.execute("SELECT id FROM users")
        known = {row["id"] for row in await cur.fetchall()}
        cur = await conn.execute("SELECT datname FROM pg_database")
        databases = [row["datname"] for row in await cur.fetchall()]
        cur = await conn.execute("SELECT rolname FROM pg_roles WHERE starts_with(rolname, 'gk_')")
        roles = [row["rolname"] for row in await cur.fetchall()]
    for row in pending:
        async with cluster.autocommit() as conn:
            cur = await conn.execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s)) AS free", [USER_LOCK_CLASS, row["id"]]
            )
            lock = await cur.fetchone()
            if lock is None or not lock["free"]:
                continue  # its creator is still at work
            await user_store.drop_user_everywhere(cluster, row["id"], row["database"])
            repair.unfinished_users.append(row["id"])
    for datname in databases:
        match = _DATABASE.fullmatch(datname)
        if match and match.group(1) not in known:
            async with cluster.autocommit() as conn:
                await conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(datname))
                )
            repair.orphan_databases.append(datname)
    owners = {m.group(1) for role in roles if (m := _ROLE.fullmatch(role))} - known
    for user_id in sorted(owners):
        async with cluster.autocommit() as conn:
            await user_store.drop_roles_with_prefix(conn, f"gk_{user_id}_")
        repair.orphan_role_owners.append(user_id)
    return repair
