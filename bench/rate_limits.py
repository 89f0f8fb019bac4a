"""The cost of issue 15's per-request checks, in-process, measured like key resolution:
a rate-limit decision (one bucket: the key's; two: the key's and its user's group), from
a process's lease and from the store itself (the file every worker maps and, for
comparison, Redis); an expiry and IP restriction check.

Run: python bench/rate_limits.py [--redis-port N]  (with a redis-server on 127.0.0.1:N for
the Redis figures; Debian: apt-get install redis-server)
Target (issue 15): a decision ≤ 5 µs median in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common import machine, write_result

from grantkey.domain.keys import KeyRecord, KeyType, Principal, User
from grantkey.domain.rate_limits import Rate
from grantkey.domain.restrictions import read_restrictions
from grantkey.services.rate_limits import RateLimits
from grantkey.services.rate_store import BucketStore, RedisBuckets, SharedBuckets
from grantkey.services.resolver import usable

NEVER = Rate(1_000_000, 1, 1_000_000)  # never refuses: every call is a full decision


def principal() -> Principal:
    now = datetime.now(UTC)
    restrictions, _ = read_restrictions({"ips": ["10.0.0.0/8", "127.0.0.0/8"]})
    record = KeyRecord(id="k1", name="guarded", type=KeyType.REGULAR, role="r", token_digest=b"",
                       sealed_token=None, apis=("sql",), services=(), table_metadata=False,
                       created_at=now, updated_at=now, expires_at=now + timedelta(days=365),
                       rate_limit=NEVER, restrictions=restrictions)
    user = User("u1", "bench", "db", "o", "p", now)
    return Principal(user, record, "token")


async def timed(call: object, rounds: int = 200, per_round: int = 200) -> float:
    """Median µs of one awaited call, over `rounds` of `per_round` calls."""
    samples = []
    for _ in range(rounds):
        started = time.perf_counter_ns()
        for _ in range(per_round):
            await call()  # type: ignore[operator]
        samples.append((time.perf_counter_ns() - started) / per_round / 1000)
    return statistics.median(samples)


async def measure(store: BucketStore, rounds: int) -> dict[str, float]:
    """RateLimits.check on a roomy bucket (mostly spent from this process's lease), and
    the store's own decision, which every request of a bucket near its limit takes."""
    who = principal()
    one = RateLimits(store, {}, "0")
    both = RateLimits(store, {"sql": str(NEVER)}, "0")
    key_only = ((b"k:bench", NEVER, 1),)
    key_and_user = (*key_only, (b"u:bench", NEVER, 1))
    return {"key bucket": await timed(lambda: one.check(who, "sql"), rounds),
            "key and user buckets": await timed(lambda: both.check(who, "sql"), rounds),
            "key bucket, the store's decision (no lease)":
                await timed(lambda: store.take(key_only), rounds),
            "key and user buckets, the store's decision (no lease)":
                await timed(lambda: store.take(key_and_user), rounds)}


def checks() -> float:
    who = principal()
    restrictions = who.key.restrictions
    assert restrictions is not None
    samples = []
    for _ in range(200):
        started = time.perf_counter_ns()
        for _ in range(200):
            usable(who)
            restrictions.allows_address("127.0.0.1")
        samples.append((time.perf_counter_ns() - started) / 200 / 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis-port", type=int, default=None)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="gkbench-", dir="/dev/shm"))  # as the server keeps it
    try:
        shared = asyncio.run(measure(SharedBuckets(folder / "rate-limits.bin"), 200))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    redis = None
    if args.redis_port is not None:
        redis = asyncio.run(measure(RedisBuckets(f"redis://127.0.0.1:{args.redis_port}/0"), 20))
    lines = ["# Per-request key checks (issue 15), in-process", "",
             *(f"- {k}: {v}" for k, v in machine().items()), "",
             "Median µs per call (200 rounds of 200 calls; Redis: 20 rounds), a rate that "
             "never refuses. `RateLimits.check` on such a roomy bucket is mostly a spend from "
             "the process's lease (services/rate_leases.py); the store's decision is what "
             "every request of a bucket near its limit costs:", "",
             "| check | shared file (one server) | Redis (several servers) |", "|---|---|---|"]
    for name in shared:
        theirs = "—" if redis is None else f"{redis[name]:.1f}"
        lines.append(f"| rate limit: {name} | {shared[name]:.2f} | {theirs} |")
    lines.append(f"| expiry and IP restriction | {checks():.2f} | — |")
    lines += ["", "Target: a rate-limit decision ≤ 5 µs median in-process (the key bucket "
              "row; a user's group limit adds a second decision)."]
    write_result("key-checks", lines)


if __name__ == "__main__":
    main()
