"""A process's leases on its rate-limit buckets: where a bucket has plenty of room, one
request takes several from the shared store (`rate_store.py`) at once, and this process's
next requests on that bucket spend them with no lock, no system call and no round trip.

A lease is taken only from a bucket whose last decision left at least `ROOM_PER_LEASED`
requests of room per request leased (so at most 1/1024 of what it saw), at most
`MAX_LEASE` requests, and lasts `LEASE_SECONDS`; what it still holds then is lost (counted,
never used). The trade-off: a lease's requests are counted when it is taken, not when they
are used, so a fast bucket that refills meanwhile may admit, within those 0.1 s, up to the
lease's size more than exact GCRA per process (at most 31 requests, at most 1/1024 of its
room). A bucket with less room than ROOM_PER_LEASED is never leased: every request is
the store's exact decision, and every refusal is the store's. The headers of a request
served from a lease are worked out from the lease's decision (the requests the lease still
holds count as room).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from grantkey.domain.rate_limits import Decision, Rate
from grantkey.services.rate_store import BucketStore

MAX_LEASE = 32
ROOM_PER_LEASED = 1024
LEASE_SECONDS = 0.1
LEASES_KEPT = 65_536  # buckets a process remembers; all forgotten at once past it


class Lease:
    __slots__ = ("base", "left", "started", "until")

    def __init__(self, base: Decision, now: float) -> None:
        self.base = base  # the store's decision that granted it
        self.left = base.taken - 1  # the request that took it used one
        self.started = now
        self.until = now + LEASE_SECONDS

    def decision(self, now: float, rate: Rate) -> Decision:
        """What the bucket looks like to this request: the room the store's decision left
        plus what the lease still holds (what refilled since, at most LEASE_SECONDS' worth,
        is not counted)."""
        base = self.base
        reset = base.reset_after - (now - self.started) - self.left * rate.emission
        return Decision(True, base.limit, base.remaining + self.left, -1,
                        reset if reset > 0 else 0.0)


class LeasedBuckets:
    def __init__(self, store: BucketStore) -> None:
        self.store = store
        self._leases: dict[bytes, Lease] = {}

    def spend(self, key: bytes, rate: Rate) -> Decision | None:
        """One request from this process's lease on the bucket `key`, if it holds one:
        the hot path of a roomy bucket (None: ask `take`)."""
        lease = self._leases.get(key)
        if lease is None or lease.left <= 0:
            return None
        now = time.monotonic()
        if now >= lease.until:
            return None
        lease.left -= 1
        return lease.decision(now, rate)

    async def take(self, takes: Sequence[tuple[bytes, Rate]]) -> list[Decision]:
        """Each bucket's decision for one request; the buckets are charged only when every
        one allows. A bucket this process holds a lease on answers from it; the others
        ask the store (which may grant a lease). The request's share of the leases is set
        aside before the store is asked (other requests of this process run meanwhile)
        and given back if the store refuses."""
        now = time.monotonic()
        leases = self._leases
        held = [leases.get(key) for key, _ in takes]
        asked = [index for index, lease in enumerate(held)
                 if lease is None or lease.left <= 0 or now >= lease.until]
        local = [_lease(held[index]) for index in range(len(takes)) if index not in asked]
        for lease in local:
            lease.left -= 1
        answers: dict[int, Decision] = {}
        if asked:
            decisions = await self.store.take([(*takes[index], _lease_size(held[index]))
                                               for index in asked])
            answers = dict(zip(asked, decisions, strict=True))
            if not all(decision.allowed for decision in decisions):
                for lease in local:
                    lease.left += 1
                return [answers.get(index) or _lease(held[index]).decision(now, rate)
                        for index, (_, rate) in enumerate(takes)]
            if len(leases) + len(asked) > LEASES_KEPT:
                leases.clear()
        granted = []
        for index, (key, rate) in enumerate(takes):
            answer = answers.get(index)
            if answer is None:
                lease = _lease(held[index])
            else:
                lease = Lease(answer, now)
                current = leases.get(key)  # another request's, granted meanwhile: kept
                if current is not None and current.left > 0 and now < current.until:
                    lease.left += current.left
                leases[key] = lease
            granted.append(lease.decision(now, rate))
        return granted

    async def close(self) -> None:
        await self.store.close()


def _lease_size(last: Lease | None) -> int:
    """How many requests to take at once: by the room the bucket's last decision left."""
    if last is None:
        return 1
    return 1 + min(MAX_LEASE - 1, (last.base.remaining + last.left) // ROOM_PER_LEASED)


def _lease(lease: Lease | None) -> Lease:
    assert lease is not None  # a bucket not asked of the store has a lease
    return lease
