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
from grantkey.services.rate_leases import LeasedBuckets
from grantkey.services.rate_store import BucketStore

GROUPS = ("sql", "copy", "jobs", "tiles", "maps")


class RateLimits:
    def __init__(self, store: BucketStore, per_user: Mapping[str, str], lookups: str) -> None:
        """`per_user`: each group's rate as a setting's text (`0`: none)."""
        self.buckets = LeasedBuckets(store)
        self.per_user: dict[str, Rate] = {}
        for group, text in per_user.items():
            rate = parse_rate(text)
            if rate is not None:
                self.per_user[group] = rate
        self.lookups = parse_rate(lookups)

    async def check(self, principal: Principal, group: str | None) -> Decision | None:
        """The decision to report (None: no limit applies); RateLimited when over one. The
        key's own limit on every API; the user's, for an API group that has one. Both
        buckets are taken at once: a request one of them refuses costs the other nothing
        (`rate_leases.py`: where a bucket has plenty of room, this process takes several
        requests from it at once)."""
        key_rate = principal.key.rate_limit
        user_rate = None if group is None or not self.per_user else self.per_user.get(group)
        if user_rate is None:  # the key's bucket alone (or none): the hot path
            if key_rate is None:
                return None
            decision = self.buckets.spend(principal.rate_bucket, key_rate)
            if decision is None:
                (decision,) = await self.buckets.take(((principal.rate_bucket, key_rate),))
                self._refuse_for_key(principal, key_rate, decision)
            return decision
        takes = [(_user_bucket(principal.user.id, group), user_rate)]
        if key_rate is not None:
            takes.insert(0, (principal.rate_bucket, key_rate))
        decisions = await self.buckets.take(takes)
        if key_rate is not None:
            self._refuse_for_key(principal, key_rate, decisions[0])
        mine = decisions[-1]
        if not mine.allowed:
            raise RateLimited(mine.headers(), (
                f"the {group} requests of user {principal.user.username} (all keys "
                f"together) are limited to {user_rate.describe()}; retry in "
                f"{mine.headers()['Retry-After']} s"))
        return decisions[0] if len(decisions) == 1 else stricter(decisions[0], mine)

    @staticmethod
    def _refuse_for_key(principal: Principal, rate: Rate, decision: Decision) -> None:
        if not decision.allowed:
            raise RateLimited(decision.headers(), (
                f'key "{principal.key.name[:100]}" may make {rate.describe()}; retry '
                f"in {decision.headers()['Retry-After']} s"))

    async def check_lookup(self, client: str) -> None:
        """Before a token is looked up in the database: the client address's bucket."""
        if self.lookups is None:
            return
        (decision,) = await self.buckets.take(((f"a:{client}".encode(), self.lookups),))
        if not decision.allowed:
            raise RateLimited(decision.headers(), (
                f"token look-ups from one address are limited to {self.lookups.describe()} "
                "(unknown tokens and the Auth API); retry in "
                f"{decision.headers()['Retry-After']} s"))

    async def close(self) -> None:
        await self.buckets.close()


@functools.lru_cache(maxsize=65_536)
def _user_bucket(user_id: str, group: str) -> bytes:
    """A user's bucket for an API group: `u:<user id>:<group>` (ids are hex; a key's:
    `Principal.rate_bucket`)."""
    return f"u:{user_id}:{group}".encode()
