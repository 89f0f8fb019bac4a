"""Which rate limits a request meets (carto-compat §11, grantkey's rule): its key's own
(`rate_limit`, on every API), its user's for the API group (settings), both applying, the
stricter reported; and, before any database work to resolve a token, its client address's.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from grantkey.domain.keys import Principal
from grantkey.domain.rate_limits import Decision, Rate, parse_rate, stricter
from grantkey.errors import RateLimited
from grantkey.services.rate_store import BucketStore

GROUPS = ("sql", "copy", "jobs", "tiles", "maps")


class RateLimits:
    def __init__(self, store: BucketStore, per_user: Mapping[str, str], lookups: str) -> None:
        """`per_user`: each group's rate as a setting's text (`0`: none)."""
        self.store = store
        self.per_user: dict[str, Rate] = {}
        for group, text in per_user.items():
            rate = parse_rate(text)
            if rate is not None:
                self.per_user[group] = rate
        self.lookups = parse_rate(lookups)

    async def check(self, principal: Principal, group: str | None) -> Decision | None:
        """The decision to report (None: no limit applies); RateLimited when over one. The
        key's own limit on every API; the user's, for an API group that has one."""
        decision = None
        rate = principal.key.rate_limit
        if rate is not None:
            bucket = _bucket("k", principal.user.id, principal.key.id)
            decision = await self.store.take(bucket, rate)
            if not decision.allowed:
                raise RateLimited(decision.headers(), (
                    f'key "{principal.key.name[:100]}" may make {rate.describe()}; retry '
                    f"in {decision.headers()['Retry-After']} s"))
        rate = None if group is None else self.per_user.get(group)
        if rate is not None:
            bucket = _bucket("u", principal.user.id, group)
            mine = await self.store.take(bucket, rate)
            if not mine.allowed:
                raise RateLimited(mine.headers(), (
                    f"the {group} requests of user {principal.user.username} (all keys "
                    f"together) are limited to {rate.describe()}; retry in "
                    f"{mine.headers()['Retry-After']} s"))
            decision = stricter(decision, mine)
        return decision

    async def check_lookup(self, client: str) -> None:
        """Before a token is looked up in the database: the client address's bucket."""
        if self.lookups is None:
            return
        decision = await self.store.take(f"a:{client}".encode(), self.lookups)
        if not decision.allowed:
            raise RateLimited(decision.headers(), (
                f"token look-ups from one address are limited to {self.lookups.describe()} "
                "(unknown tokens and the Auth API); retry in "
                f"{decision.headers()['Retry-After']} s"))

    async def close(self) -> None:
        await self.store.close()


@functools.lru_cache(maxsize=65_536)
def _bucket(kind: str, owner: str, name: str) -> bytes:
    """A bucket's name: `k:<user id>:<key id>`, `u:<user id>:<group>` (ids are hex)."""
    return f"{kind}:{owner}:{name}".encode()
