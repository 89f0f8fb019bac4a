"""Token → principal, looked up among the target user's keys only.

A token is accepted when it is a key's current token, or a regenerated key's old token
while its grace lasts; never once its key expired. Both moments are checked at every
request, cached or not, by every process against its own clock: they end everywhere at once.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable

from cryptography.exceptions import InvalidTag

from grantkey.db import keys as key_store
from grantkey.db.cluster import Cluster
from grantkey.domain.keys import KeyRecord, Principal, User
from grantkey.domain.secrets_box import SecretBox
from grantkey.domain.tokens import digest, is_well_formed
from grantkey.errors import KeyExpired, Unauthorized
from grantkey.services.revocation import KeyCache


class KeyResolver:
    def __init__(self, cluster: Cluster, cache: KeyCache, box: SecretBox) -> None:
        self.cluster = cluster
        self.cache = cache
        self.box = box

    async def resolve(self, user: User, token: str, *, fresh: bool,
                      before_lookup: Callable[[], Awaitable[None]] | None = None) -> Principal:
        """`fresh` skips the cache: the Auth API always asks the database. `before_lookup`
        runs before any database work (a client address's rate limit), also for a token
        that is not even well formed."""
        if not is_well_formed(token):
            if before_lookup is not None:
                await before_lookup()
            raise Unauthorized("unknown token")
        token_digest = digest(token)
        principal = None if fresh else self.cache.get(user.id, token_digest)
        if principal is None:
            if before_lookup is not None:
                await before_lookup()
            async with self.cluster.user_database(user.database) as conn:
                record = await key_store.find_by_digest(conn, token_digest)
            principal = self._principal(user, record, token, token_digest)
            self.cache.put(principal, token_digest)
        return usable(principal)

    def _principal(self, user: User, record: KeyRecord | None, token: str,
                   token_digest: bytes) -> Principal:
        if record is None:
            raise Unauthorized("unknown token")
        if hmac.compare_digest(record.token_digest, token_digest):
            return Principal(user=user, key=record, token=token)
        if (record.grace_digest is None or record.grace_until is None
                or record.grace_password is None
                or not hmac.compare_digest(record.grace_digest, token_digest)):
            raise Unauthorized("unknown token")
        try:
            password = self.box.open_with_old_token(record.grace_password, token,
                                                    record.id.encode())
        except InvalidTag:
            raise Unauthorized("unknown token") from None
        return Principal(user=user, key=record, token=token, password=password,
                         token_until=record.grace_until)


def usable(principal: Principal, now: float | None = None) -> Principal:
    """The principal, unless its key expired or its old token's grace ended (at `now`,
    seconds since 1970; by default this process's clock's now)."""
    stop = principal.stop_time
    if stop is None:
        return principal
    if now is None:
        now = time.time()
    if now < stop:
        return principal
    expires_at = principal.key.expires_at
    if expires_at is not None and now >= expires_at.timestamp():
        raise KeyExpired(principal.key.name, expires_at)
    raise Unauthorized("a regenerated key's old token, after its grace")
