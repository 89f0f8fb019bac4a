"""What happens after a key's token stops being valid: caches, sessions, other servers,
and the removal of a deleted key's role (best effort, retried at start-up)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

from grantkey.db import keys as key_store
from grantkey.db import privileges
from grantkey.db import revocations as store
from grantkey.db import users as user_store
from grantkey.db.cluster import Cluster
from grantkey.db.failures import CLEANUP_ERRORS, is_lock_conflict
from grantkey.db.managers import PRIVILEGE_ROLE_PATTERN
from grantkey.db.role_pools import RolePools
from grantkey.domain import names
from grantkey.domain.keys import KeyRecord, Principal, User
from grantkey.errors import DatabaseUnavailable
from grantkey.faults import checkpoint
from grantkey.services.events import Events, KeyRevoked
from grantkey.services.lru import Lru

log = logging.getLogger("grantkey.revocation")
DECIDE_ATTEMPTS = 5
CLEANUP_ANSWER_SECONDS = 2.0
RETRY_SECONDS = 30.0
R = TypeVar("R", bound=KeyRevoked)


class KeyCache:
    """token digest → principal. Only saves look-ups; never the last word on validity."""

    def __init__(self, capacity: int) -> None:
        self._entries: Lru[tuple[str, bytes], Principal] = Lru(capacity)

    @property
    def capacity(self) -> int:
        return self._entries.capacity

    def get(self, user_id: str, token_digest: bytes) -> Principal | None:
        return self._entries.get((user_id, token_digest))

    def put(self, principal: Principal, token_digest: bytes) -> None:
        """`token_digest`: the presented token's (a key's old token, in its grace, is not
        the key's own digest)."""
        self._entries.put((principal.user.id, token_digest), principal)

    def evict(self, user_id: str, token_digest: bytes) -> None:
        self._entries.pop((user_id, token_digest))

    def evict_user(self, user_id: str) -> None:
        """Every token of one user: a revocation also ends an old token's grace, cached
        under its own digest."""
        self._entries.pop_where(lambda key: key[0] == user_id)

    def evict_payload(self, payload: str) -> None:
        """Handle a NOTIFY payload `<user id>:<digest hex>:...`; anything else clears all."""
        user_id, _, rest = payload.partition(":")
        try:
            bytes.fromhex(rest.partition(":")[0])
        except ValueError:
            self.clear()
            return
        self.evict_user(user_id)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class Revoker:
    """Revocation in three steps. `decide()` is the decisive transaction on the metadata
    database (no login, no password, a pending-cleanup row, the event's audit row and its
    NOTIFY delivered at commit); the event's subscribers (`forget_revoked()`,
    `end_revoked_sessions()`) act in this process and end the role's sessions
    cluster-wide; and `remove_key_role()` removes the role without raising anyone's
    privileges. Every other
    process acts on the NOTIFY (and, after a lost LISTEN connection, on the pending rows),
    so a crash after the commit skips nothing that matters."""

    def __init__(self, cluster: Cluster, cache: KeyCache, events: Events) -> None:
        self.cluster = cluster
        self.cache = cache
        self.events = events
        self.pools: RolePools | None = None
        # what else of the role this process remembers (the SQL API's connection strings)
        self.forget_role: Callable[[str, str], None] | None = None
        self._cleanups: set[asyncio.Task[bool]] = set()

    async def decide(self, user: User, record: KeyRecord, *, password: str | None,
                     event: Callable[[int], R]) -> R:
        """Decide the revocation of `record` and commit (delete: `password` None, and the
        role also leaves every role it was a member of, so whatever it leaves behind runs
        with no rights; regenerate: the new role password). `event(role OID)` is recorded
        in that transaction (its audit row and its NOTIFY) and returned, to be delivered
        once the caller is done.

        A client can hold its own role's catalog row (an uncommitted `ALTER ROLE
        CURRENT_USER …`): the decision waits at most a second for it, then ends the role's
        sessions and tries again."""
        for attempt in range(1, DECIDE_ATTEMPTS + 1):
            try:
                async with self.cluster.metadata() as meta:
                    await store.bounded_lock_wait(meta)
                    oid = await store.role_oid(meta, record.role)
                    revoked = event(oid)
                    await self.events.record(meta, revoked)
                    await store.tombstone(meta, user.id, record.token_digest)
                    if password is None:
                        await store.disable_login(meta, record.role)
                        await store.leave_every_role(meta, record.role, oid)
                        await store.record_pending(meta, record.role, user.id, user.database,
                                                   oid)
                        checkpoint("key.deleted_before_commit")
                    else:
                        await key_store.set_role_password(meta, record.role, password)
                return revoked
            except CLEANUP_ERRORS as error:
                if not is_lock_conflict(error):  # the role is locked by its own sessions
                    raise
                if attempt == DECIDE_ATTEMPTS:
                    raise DatabaseUnavailable(
                        "the key's role stayed locked by its own sessions; try again") from error
                async with self.cluster.metadata() as meta:
                    oid = await store.role_oid(meta, record.role)
                await self.end_sessions(oid)
        raise AssertionError("unreachable")

    async def forget_revoked(self, event: KeyRevoked) -> None:
        """A subscriber: PostgreSQL already refuses the old login; forget it here."""
        self.cache.evict_user(event.user.id)
        if self.forget_role is not None:
            self.forget_role(event.user.database, event.key.role)
        if self.pools is not None:
            await self.pools.discard_role(event.user.database, event.key.role)

    async def end_revoked_sessions(self, event: KeyRevoked) -> None:
        """A subscriber: end the revoked role's sessions, cluster-wide."""
        await self.end_sessions(event.role_oid)

    async def settled(self, user: User, record: KeyRecord) -> None:
        """The key's row no longer names the old token: its tombstone can go."""
        try:
            async with self.cluster.metadata() as meta:
                await store.forget_tombstone(meta, user.id, record.token_digest)
        except CLEANUP_ERRORS as error:
            log.warning("a revoked token's tombstone stays: %s", error)

    async def end_sessions(self, role_oid: int, started_before: float | None = None) -> None:
        """Terminate every session of a role (that started before `started_before`),
        cluster-wide. Never raises (every process does it on the NOTIFY too, and the
        cleanup again)."""
        try:
            async with self.cluster.metadata() as conn:
                await store.terminate_sessions(conn, role_oid, started_before)
        except CLEANUP_ERRORS as error:
            log.warning("could not end the sessions of a revoked role: %s", error)

    async def _pending(self, older_than: float = 0) -> list[dict[str, object]]:
        """The revocations whose cleanup is still owed (none, logged, if unreadable)."""
        try:
            async with self.cluster.metadata() as meta:
                return await store.pending(meta, older_than)
        except CLEANUP_ERRORS as error:
            log.warning("pending revocations could not be read: %s", error)
            return []

    async def pending_roles(self) -> list[tuple[str, str, int]]:
        """(database, role, OID) of every revocation whose cleanup is still owed."""
        return [(str(r["database"]), str(r["role"]), int(str(r["role_oid"])))
                for r in await self._pending()]

    async def clean_up(self, user_id: str, database: str, owner_role: str, role: str,
                       role_oid: int) -> None:
        """`remove_key_role` in the background: waited for up to CLEANUP_ANSWER_SECONDS (the
        usual case ends well within), so that a tenant's lock on one of the key's tables
        delays no answer. What is not finished when the process stops is retried at the
        next start (its row stays in `revocations`)."""
        task = asyncio.ensure_future(
            self.remove_key_role(user_id, database, owner_role, role, role_oid))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), CLEANUP_ANSWER_SECONDS)

    async def drain(self) -> None:
        """Let the background cleanups finish (before the services close)."""
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)

    async def remove_key_role(self, user_id: str, database: str, owner_role: str, role: str,
                              role_oid: int) -> bool:
        """Best effort, idempotent: the key's row, its code, its grants to strangers, its
        privileges in every database, its role. False (and logged) if anything is left;
        the pending row then stays for the start-up repair."""
        try:
            async with self.cluster.metadata() as meta:
                await store.terminate_sessions(meta, role_oid)
            async with self.cluster.user_database(database) as conn:
                await key_store.delete_key_row_by_role(conn, role)
            if await self._exists(role):
                prefix = names.user_role_prefix(user_id)
                # each step its own transaction: one a tenant's lock times out leaves the
                # earlier ones done (the role already left every role it was a member of,
                # so what is left runs with no rights); code goes before anything is
                # handed to the owner, and a privilege role never keeps code a key gave it
                async with self.cluster.user_database(database) as conn:
                    for oid in [role_oid, *await store.privilege_role_oids(
                            conn, prefix, PRIVILEGE_ROLE_PATTERN)]:
                        await store.drop_key_code(conn, oid)
                async with self.cluster.user_database(database) as conn:
                    await store.revoke_foreign_grants(conn, role_oid, prefix)
                async with self.cluster.user_database(database) as conn:
                    await store.hand_over_and_drop_owned(conn, role, owner_role)
                await store.drop_role_everywhere(self.cluster, role, role_oid)
            async with self.cluster.metadata() as meta:
                await store.forget_pending(meta, role)
        except CLEANUP_ERRORS as error:
            log.warning("removing revoked role %s is left for a later retry: %s", role, error)
            return False
        await self.drop_orphan_privilege_roles(user_id, database)
        return True

    async def _exists(self, role: str) -> bool:
        async with self.cluster.metadata() as meta:
            return await store.role_oid(meta, role) != 0

    async def drop_orphan_privilege_roles(self, user_id: str, database: str) -> None:
        """Privilege roles whose table or schema is gone; each one best effort (a role a
        key made own something is cleaned of it first, in every database)."""
        try:
            async with self.cluster.user_database(database) as conn:
                orphans = await privileges.orphan_privilege_roles(conn, user_id)
            for role in orphans:
                async with self.cluster.metadata() as meta:
                    oid = await store.role_oid(meta, role)
                if oid:
                    await store.drop_role_everywhere(self.cluster, role, oid)
        except CLEANUP_ERRORS as error:
            log.warning("orphan privilege roles of user %s left for later: %s", user_id, error)

    async def retry_forever(self) -> None:
        """In every server process: every RETRY_SECONDS, one of them (an advisory lock
        decides) retries the cleanups a tenant's lock or a failure left owed."""
        while True:
            await asyncio.sleep(RETRY_SECONDS)
            await self.retry_once()

    async def retry_once(self) -> list[str]:
        try:
            async with self.cluster.autocommit() as lock:
                if not await store.try_retry_lock(lock):
                    return []
                try:
                    async with self.cluster.metadata() as meta:
                        owners = await user_store.owner_roles(meta)
                    return await self.finish_pending(owners, older_than=RETRY_SECONDS)
                finally:
                    await store.release_retry_lock(lock)
        except CLEANUP_ERRORS as error:
            log.warning("retrying pending revocations failed: %s", error)
            return []

    async def finish_pending(self, owners: dict[str, str], older_than: float = 0) -> list[str]:
        """Finish every revocation a crash or a failure left owed (at start-up, and
        periodically). `owners` maps user ids to owner roles. Never raises."""
        finished = []
        for row in await self._pending(older_than):
            role, user_id = str(row["role"]), str(row["user_id"])
            owner = owners.get(user_id)
            if owner is None:  # the user is gone: its roles go with the user
                try:
                    async with self.cluster.metadata() as meta:
                        await store.forget_pending(meta, role)
                except CLEANUP_ERRORS:
                    continue
                continue
            if await self.remove_key_role(user_id, str(row["database"]), owner, role,
                                          int(str(row["role_oid"]))):
                finished.append(role)
        return finished
