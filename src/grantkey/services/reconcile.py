"""Start-up repair: finish or undo what a crash left half-done.

Key changes are single transactions inside a user's database and need no repair. User
creation and deletion span CREATE/DROP DATABASE, which cannot run in a transaction: a
user row stays in state `creating` or `deleting` until the last step, so at start-up
every such row whose creator is gone (its advisory lock is free) is removed with all it
owns. Databases and roles named for an id that has no user row are dropped too, and every
key revocation whose cleanup is still owed is finished.

Each repair is best effort: one tenant's damage (a role another tenant's grant keeps
alive, a lock) is logged and skipped, and never stops the server from starting.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

from grantkey.db import locks
from grantkey.db import repair as repair_store
from grantkey.db import users as user_store
from grantkey.db.cluster import Cluster
from grantkey.db.failures import CLEANUP_ERRORS
from grantkey.domain import names
from grantkey.services.revocation import Revoker

log = logging.getLogger("grantkey.reconcile")

_DATABASE = names.USER_DATABASE
_ROLE = names.USER_ROLE


@dataclass
class Repair:
    unfinished_users: list[str] = field(default_factory=list)
    orphan_databases: list[str] = field(default_factory=list)
    orphan_role_owners: list[str] = field(default_factory=list)
    finished_revocations: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def anything(self) -> bool:
        return bool(self.unfinished_users or self.orphan_databases or self.orphan_role_owners
                    or self.finished_revocations or self.failed)


async def _attempt(repair: Repair, what: str, work: Callable[[], Awaitable[bool | None]]
                   ) -> bool:
    """Run one repair; True if it did its work (False: nothing to do, or it failed)."""
    try:
        result = await work()
    except CLEANUP_ERRORS as error:
        log.warning("start-up repair of %s failed, left for the next start: %s", what, error)
        repair.failed.append(what)
        return False
    return result is not False


async def reconcile(cluster: Cluster, revoker: Revoker | None = None) -> Repair:
    repair = Repair()
    async with cluster.autocommit() as conn:
        state = await repair_store.cluster_state(conn)
    pending, known, databases, roles, owners = (
        state.pending, state.known, state.databases, state.roles, state.owners)
    for user_id, database in pending:
        if await _attempt(repair, f"unfinished user {user_id}",
                          partial(_drop_unfinished, cluster, user_id, database)):
            repair.unfinished_users.append(user_id)
    for datname in databases:
        match = _DATABASE.fullmatch(datname)
        if match and match.group(1) not in known and await _attempt(
                repair, f"orphan database {datname}",
                partial(_drop_database, cluster, datname)):
            repair.orphan_databases.append(datname)
    strays = {m.group(1) for role in roles if (m := _ROLE.fullmatch(role))} - known
    for user_id in sorted(strays):
        if await _attempt(repair, f"roles of gone user {user_id}",
                          partial(user_store.drop_user_roles, cluster, user_id)):
            repair.orphan_role_owners.append(user_id)
    if revoker is not None:
        repair.finished_revocations = await revoker.finish_pending(owners)
    return repair


async def _drop_unfinished(cluster: Cluster, user_id: str, database: str) -> bool:
    async with cluster.autocommit() as conn:
        if not await locks.user_lock_free(conn, user_id):
            return False  # its creator is still at work
        await user_store.drop_user_everywhere(cluster, user_id, database)
        return True


async def _drop_database(cluster: Cluster, datname: str) -> None:
    async with cluster.autocommit() as conn:
        await repair_store.drop_database(conn, datname)
