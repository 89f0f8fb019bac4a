"""Token → principal, looked up among the target user's keys only."""

from __future__ import annotations

import hmac

from grantkey.db import keys as key_store
from grantkey.db.cluster import Cluster
from grantkey.domain.keys import Principal, User
from grantkey.domain.tokens import digest, is_well_formed
from grantkey.errors import Unauthorized
from grantkey.services.revocation import KeyCache


class KeyResolver:
    def __init__(self, cluster: Cluster, cache: KeyCache) -> None:
        self.cluster = cluster
        self.cache = cache

    async def resolve(self, user: User, token: str, *, fresh: bool) -> Principal:
        """`fresh` skips the cache: the Auth API always asks the database."""
        if not is_well_formed(token):
            raise Unauthorized("unknown token")
        token_digest = digest(token)
        if not fresh:
            cached = self.cache.get(user.id, token_digest)
            if cached is not None:
                return cached
        async with self.cluster.user_database(user.database) as conn:
            record = await key_store.find_by_digest(conn, token_digest)
        if record is None or not hmac.compare_digest(record.token_digest, token_digest):
            raise Unauthorized("unknown token")
        principal = Principal(user=user, key=record, token=token)
        self.cache.put(principal)
        return principal
