"""Start-up upgrade: every user database gets the migrations it has not had yet.

Run once per start, before the server takes requests, under an advisory lock in the
metadata database. Only users whose recorded version is behind are visited, so a start
with nothing to do touches no user database. One database that fails is logged and
skipped (retried at the next start); it never stops the start.
"""

from __future__ import annotations

import logging
from functools import partial

from grantkey.db import bootstrap, locks, migrations, storage_quota
from grantkey.db import users as user_store
from grantkey.db.cluster import Cluster
from grantkey.db.failures import CLEANUP_ERRORS

log = logging.getLogger("grantkey.upgrade")


async def upgrade_user_databases(cluster: Cluster) -> dict[str, int]:
    """Returns {username: version now} for every user database visited."""
    upgraded: dict[str, int] = {}
    async with cluster.autocommit() as lock:
        await locks.lock(lock, migrations.MIGRATION_LOCK)
        try:
            async with cluster.metadata() as meta:
                behind = await user_store.users_behind(meta, migrations.USER_LATEST)
            routine = lock.info.user
            for row in behind:
                try:
                    async with cluster.superuser_session(row["database"]) as su:
                        await user_store.hand_over_user_database(su, row["id"], routine)
                    async with cluster.autocommit(row["database"]) as conn, conn.transaction():
                        version = await migrations.run_user_migrations(
                            conn, partial(cluster.superuser_session, row["database"]))
                    async with cluster.metadata() as meta:
                        await user_store.set_schema_version(meta, row["id"], version)
                    upgraded[row["username"]] = version
                except CLEANUP_ERRORS as error:
                    log.warning("user database of %s not upgraded, retried at the next "
                                "start: %s", row["username"], error)
        finally:
            await locks.unlock(lock, migrations.MIGRATION_LOCK)
    return upgraded


async def superuser_available(cluster: Cluster) -> bool:
    """Can grantkey act as a PostgreSQL superuser (its admin, or GRANTKEY_SUPERUSER_URL)?"""
    async with cluster.superuser_session("postgres") as su:
        return await user_store.is_superuser(su)


async def apply_storage_quotas(cluster: Cluster, size: str) -> dict[str, str]:
    """Give every user database the storage quota `size` (or none, for -1) where it has
    another. Returns {username: size} for each database changed; one that fails is logged
    and retried at the next start."""
    async with cluster.metadata() as meta:
        others = await user_store.users_with_other_quota(
            meta, size, migrations.QUOTA_VERSION)
    changed: dict[str, str] = {}
    for row in others:
        try:
            async with cluster.user_database(row["database"]) as conn:
                await storage_quota.set_limit(conn, size)
            async with cluster.metadata() as meta:
                await user_store.record_storage_quota(meta, row["id"], size)
            changed[row["username"]] = size
        except CLEANUP_ERRORS as error:
            log.warning("storage quota of %s not applied, retried at the next start: %s",
                        row["username"], error)
    return changed


async def apply_cluster_limits(superuser_url: str, temp_file_limit: str) -> None:
    """For a cluster grantkey owns (the embedded one): bounds on temporary files."""
    await bootstrap.apply_cluster_limits(superuser_url, temp_file_limit)


async def prepare_routine_admin(superuser_url: str, role: str) -> None:
    """For a cluster grantkey owns: the routine admin role, and what it must own."""
    await bootstrap.prepare_routine_admin(superuser_url, role)
