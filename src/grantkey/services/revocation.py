"""What happens after a key's token stops being valid: caches, sessions, other servers."""

from __future__ import annotations

from collections import OrderedDict

from grantkey.db import keys as key_store
from grantkey.db.cluster import Cluster
from grantkey.db.role_pools import RolePools
from grantkey.domain.keys import KeyRecord, Principal, User

CHANNEL = "grantkey_keys"


class KeyCache:
    """token digest → principal. Only saves look-ups; never the last word on validity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, bytes], Principal] = OrderedDict()

    def get(self, user_id: str, token_digest: bytes) -> Principal | None:
        entry = self._entries.get((user_id, token_digest))
        if entry is not None:
            self._entries.move_to_end((user_id, token_digest))
        return entry

    def put(self, principal: Principal) -> None:
        if self.capacity <= 0:
            return
        self._entries[(principal.user.id, principal.key.token_digest)] = principal
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def evict(self, user_id: str, token_digest: bytes) -> None:
        self._entries.pop((user_id, token_digest), None)

    def evict_payload(self, payload: str) -> None:
        """Handle a NOTIFY payload `<user id>:<digest hex>:...`; anything else clears all."""
        user_id, _, rest = payload.partition(":")
        try:
            self.evict(user_id, bytes.fromhex(rest.partition(":")[0]))
        except ValueError:
            self.clear()

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def payload(user: User, record: KeyRecord) -> str:
    return f"{user.id}:{record.token_digest.hex()}:{user.database}:{record.role}"


USER_DELETED = "user-deleted:"


def user_deleted(username: str) -> str:
    """The payload telling every process that a user is going away."""
    return USER_DELETED + username


def deleted_username(message: str) -> str | None:
    return message[len(USER_DELETED):] if message.startswith(USER_DELETED) else None


def payload_role(message: str) -> tuple[str, str] | None:
    """(database, role) named by a payload, if it names them."""
    parts = message.split(":")
    return (parts[2], parts[3]) if len(parts) == 4 else None


class Revoker:
    def __init__(self, cluster: Cluster, cache: KeyCache) -> None:
        self.cluster = cluster
        self.cache = cache
        self.pools: RolePools | None = None

    async def revoked(self, user: User, record: KeyRecord, role_oid: int) -> None:
        """Called after the change committed: PostgreSQL already refuses the old login."""
        self.cache.evict(user.id, record.token_digest)
        if self.pools is not None:
            await self.pools.discard_role(user.database, record.role)
        async with self.cluster.metadata() as conn:
            await key_store.terminate_sessions(conn, role_oid)
            await conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload(user, record)])
