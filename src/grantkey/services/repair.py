"""Restoring key roles a client tampered with: a changed password, role settings.

Any role may `ALTER ROLE CURRENT_USER PASSWORD …` or `… SET …`: with no key at all, that
would break the user's default public key for everyone. Settings that matter are pinned
in every key session's startup packet (`db/cluster.py` KEY_SESSION), which outranks them;
the rest are reset here. A password is restored to the one derived from the key's current
token, under the user's key lock so that a regenerate in flight is never undone, and only
for a key whose token is still valid and whose role may still log in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from grantkey.db import keys as key_store
from grantkey.db import revocations as store
from grantkey.db.cluster import AdminConnection, Cluster
from grantkey.domain.keys import KEY_TYPES, Principal, User
from grantkey.domain.secrets_box import SecretBox
from grantkey.domain.tokens import digest
from grantkey.services.keyed_locks import KeyedLocks
from grantkey.services.keys import readable_token

log = logging.getLogger("grantkey.repair")


@dataclass
class RepairReport:
    restored: list[str] = field(default_factory=list)
    unknown_token: list[str] = field(default_factory=list)


class RoleRepair:
    def __init__(self, cluster: Cluster, box: SecretBox,
                 queue: KeyedLocks | None = None) -> None:
        self.cluster = cluster
        self.box = box
        # the queue KeyService uses: waiting for a user's key lock holds no connection
        self._queued = queue if queue is not None else KeyedLocks()

    async def restore_login(self, principal: Principal) -> bool:
        """After a refused login: True if the key is valid and its role was restored."""
        user = principal.user
        async with self._queued.hold(user.id), self.cluster.metadata() as meta:
            await store.lock_user_keys(meta, user.id)
            async with self.cluster.user_database(user.database) as conn:
                record = await key_store.find_by_digest(conn, digest(principal.token))
            if record is None or record.role != principal.key.role:
                return False  # deleted or regenerated: the refusal was right
            if record.token_digest != digest(principal.token) or record.expired(datetime.now(UTC)):
                return False  # an old token in its grace (the new one repairs), or expired
            if await store.is_tombstoned(meta, user.id, record.token_digest):
                return False  # revoked by a change a crash cut short: never undone
            if not await store.can_log_in(meta, record.role):
                return False  # a revocation in progress
            await self._restore(meta, record.role, principal.token)
        log.warning("restored the password and settings of a key role of user %s", user.id)
        return True

    async def repair_user(self, user: User) -> RepairReport:
        """Every key of a user: password from its token (where the token is known), and
        role settings reset. The CLI's `grantkey users repair`."""
        report = RepairReport()
        async with self._queued.hold(user.id), self.cluster.metadata() as meta:
            await store.lock_user_keys(meta, user.id)
            async with self.cluster.user_database(user.database) as conn:
                _, records = await key_store.list_keys(
                    conn, types=list(KEY_TYPES), only_id=None, order="name",
                    descending=False, limit=1_000_000, offset=0)
            for record in records:
                token = readable_token(self.box, record)
                if token is None:
                    await store.reset_role_settings(meta, record.role)
                    report.unknown_token.append(record.name)
                    continue
                if not await store.can_log_in(meta, record.role) or await store.is_tombstoned(
                        meta, user.id, record.token_digest):
                    continue
                await self._restore(meta, record.role, token)
                report.restored.append(record.name)
        return report

    async def reset_all_settings(self) -> list[str]:
        """Start-up: reset the role settings of every grantkey role that has some."""
        async with self.cluster.metadata() as meta:
            roles = await store.roles_with_settings(meta)
            for role in roles:
                await store.reset_role_settings(meta, role)
        return roles

    async def _restore(self, conn: AdminConnection, role: str, token: str) -> None:
        await key_store.set_role_password(conn, role, self.box.role_password(role, token))
        await store.reset_role_settings(conn, role)
