"""Where rate-limit buckets live: a file every worker of one server maps (no service to
run), or Redis, which several servers share (GRANTKEY_REDIS_URL).

The file is a fixed table of 16-byte slots (a bucket's 64-bit fingerprint, its TAT as
wall-clock seconds), found by open addressing within a few slots; a slot whose TAT has
passed holds nothing a new bucket would not start with, so it is reused. Every worker
takes the file's lock (`flock`) around one read-decide-write: the decision is atomic
across processes. A table too full keeps the decision correct for the buckets it holds and
forgets the one closest to full (a bucket forgotten starts full: more permissive, never
less). TATs are wall-clock times; one further ahead than its rate allows (the clock went
back) counts as full. Servers sharing a data directory on one machine share their buckets.

The file lives in shared memory (`/dev/shm`, named after the data directory), not on disk:
a disk-backed mapping that every request writes makes the kernel write it back, and a write
to a page under writeback waits for the disk (measured: a third of the throughput gone).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import math
import mmap
import os
import stat
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from grantkey.domain.rate_limits import Decision, Rate, gcra_up_to

log = logging.getLogger("grantkey.rate_limits")
SLOT = struct.Struct("<Qd")
# TATs are seconds since this moment (2025-01-01): small numbers keep sub-microsecond
# precision in a double, which seconds since 1970 (about 1.7e9) do not
EPOCH = 1_735_689_600.0
SLOTS = 1 << 17  # 2 MiB
PROBES = 16
FILE_NAME = "rate-limits.bin"
SHARED_MEMORY = Path("/dev/shm")  # noqa: S108 - opened O_NOFOLLOW, owner checked


def table_path(data_dir: Path) -> Path:
    """Where the workers of the server on `data_dir` keep their buckets: in shared memory
    where the machine has it, else in the data directory."""
    if SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK):
        tag = hashlib.blake2b(str(data_dir.resolve()).encode(), digest_size=8).hexdigest()
        return SHARED_MEMORY / f"grantkey-{tag}-{FILE_NAME}"
    return data_dir / FILE_NAME


# the buckets one request takes from: each one's name, the rate it is held to, and how
# many requests to take at once if it has room for them (else one: `gcra_up_to`)
Takes = Sequence[tuple[bytes, Rate, int]]


class BucketStore(Protocol):
    async def take(self, takes: Takes) -> list[Decision]:
        """Each bucket's decision; the buckets are charged only when every one allows (a
        request one of them refuses costs the others nothing)."""
        ...

    async def close(self) -> None: ...


@functools.lru_cache(maxsize=65_536)
def fingerprint(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") | 1


class SharedBuckets:
    """The buckets of one server's workers, in a file they all map."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._map: mmap.mmap | None = None

    def _open(self) -> mmap.mmap:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            os.close(fd)  # another account's file, in a directory everyone writes to
            raise OSError(f"{self.path} is not this account's private file")
        size = SLOT.size * SLOTS
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        self._fd, self._map = fd, mmap.mmap(fd, size)
        return self._map

    async def take(self, takes: Takes) -> list[Decision]:
        return self.take_all_now(takes, time.time() - EPOCH)

    def take_now(self, key: bytes, rate: Rate, now: float) -> Decision:
        """One request's decision on one bucket at `now` (seconds since EPOCH)."""
        return self.take_all_now(((key, rate, 1),), now)[0]

    def take_all_now(self, takes: Takes, now: float) -> list[Decision]:
        """`take` at `now`, under one lock: every bucket decided, then written if all
        allow."""
        table = self._map if self._map is not None else self._open()
        decisions: list[Decision] = []
        found: list[tuple[int, int, float | None]] = []
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # type: ignore[arg-type]
        try:
            for key, rate, count in takes:
                print_ = fingerprint(key)
                offset, tat = self._find(table, print_, print_ % SLOTS, now)
                new_tat, decision = gcra_up_to(tat, now, rate, count)
                decisions.append(decision)
                found.append((offset, print_, new_tat))
            if len(found) == 1 and found[0][2] is not None:
                SLOT.pack_into(table, found[0][0], found[0][1], found[0][2])
            elif all(new_tat is not None for _, _, new_tat in found):
                for _, print_, new_tat in found:  # found again: two new buckets may have
                    offset, _ = self._find(table, print_, print_ % SLOTS, now)  # one slot
                    SLOT.pack_into(table, offset, print_, new_tat)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # type: ignore[arg-type]
        return decisions

    @staticmethod
    def _find(table: mmap.mmap, print_: int, start: int, now: float) -> tuple[int, float | None]:
        """The bucket's slot and TAT, or a free slot (or the fullest bucket's: the one
        nearest to refilled, the smallest TAT, whose loss gives away the least) and None."""
        free, fullest, fullest_tat = -1, -1, math.inf
        for probe in range(PROBES):
            offset = ((start + probe) % SLOTS) * SLOT.size
            found, tat = SLOT.unpack_from(table, offset)
            if found == print_:
                return offset, tat
            if free < 0 and (found == 0 or tat <= now):
                free = offset
            elif tat < fullest_tat:
                fullest, fullest_tat = offset, tat
        return (free if free >= 0 else fullest), None

    async def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# GCRA in Redis, on Redis's clock (servers' clocks may differ): KEYS the buckets, ARGV
# each one's emission interval and tolerance in seconds and how many requests to take at
# once if it has room (else one). Returns {allowed, ttl, wait, taken} of strings per bucket;
# writes only when every bucket allows.
_SCRIPT = """
local clock = redis.call('TIME')
local now = (tonumber(clock[1]) - 1735689600) + tonumber(clock[2]) / 1000000
local answers, writes, allowed = {}, {}, true
for i, key in ipairs(KEYS) do
  local emission = tonumber(ARGV[3 * i - 2])
  local tolerance = tonumber(ARGV[3 * i - 1])
  local count = tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', key))
  if not tat or tat < now or tat > now + tolerance + emission then tat = now end
  if count > 1 and (tat + emission * count - tolerance) - now > 0 then count = 1 end
  local new_tat = tat + emission * count
  local wait = (new_tat - tolerance) - now
  if wait > 0 then
    answers[i] = {'0', tostring(tat - now), tostring(wait), '0'}
    allowed = false
  else
    answers[i] = {'1', tostring(new_tat - now), '-1', tostring(count)}
    writes[i] = new_tat
  end
end
if allowed then
  for i, key in ipairs(KEYS) do
    redis.call('SET', key, tostring(writes[i]), 'PX', math.ceil((writes[i] - now) * 1000) + 1)
  end
end
return answers
"""


class RedisBuckets:
    """Buckets several servers share. When Redis cannot be reached the request is let
    through (logged at most once a minute): a limit is not worth an outage."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as redis_asyncio  # only where configured

        self._client: Any = redis_asyncio.Redis.from_url(url, socket_timeout=1,
                                                         socket_connect_timeout=1)
        self._script = self._client.register_script(_SCRIPT)
        self._warned = 0.0

    async def take(self, takes: Takes) -> list[Decision]:
        from redis.exceptions import RedisError, ResponseError

        try:
            answers = await self._script(
                keys=[redis_key(key) for key, _, _ in takes],
                args=[repr(value) for _, rate, count in takes
                      for value in (rate.emission, rate.tolerance, count)])
        except (RedisError, OSError) as error:
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.warning("Redis %s, requests not rate limited: %s",
                            "refused the rate-limit script" if isinstance(error, ResponseError)
                            else "unreachable", error)
            return [Decision(True, rate.limit, rate.burst, -1, 0.0) for _, rate, _ in takes]
        return [_decision(rate, *answer) for (_, rate, _), answer in zip(takes, answers,
                                                                          strict=True)]

    async def close(self) -> None:
        await self._client.aclose()


def redis_key(bucket: bytes) -> bytes:
    """A bucket's Redis key, `grantkey:rl:<kind>:{<owner>}:<name>`: the braces make a
    request's buckets (all its user's) one hash slot, which a script touching several keys
    needs on a Redis Cluster."""
    kind, _, rest = bucket.partition(b":")
    owner, _, name = rest.partition(b":")
    return b"grantkey:rl:" + kind + b":{" + owner + b"}:" + name


def _decision(rate: Rate, allowed: bytes | str, ttl: bytes | str, wait: bytes | str,
              taken: bytes | str) -> Decision:
    """A bucket's decision from what the script answered for it."""
    ttl_seconds = float(ttl)
    remaining = max(int((rate.tolerance - ttl_seconds) / rate.emission + 1e-9), 0)
    return Decision(allowed in (b"1", "1"), rate.limit, remaining, float(wait), ttl_seconds,
                    int(taken))
