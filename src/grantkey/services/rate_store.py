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
from pathlib import Path
from typing import Any, Protocol

from grantkey.domain.rate_limits import Decision, Rate, gcra

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


class BucketStore(Protocol):
    async def take(self, key: bytes, rate: Rate) -> Decision: ...

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

    async def take(self, key: bytes, rate: Rate) -> Decision:
        return self.take_now(key, rate, time.time() - EPOCH)

    def take_now(self, key: bytes, rate: Rate, now: float) -> Decision:
        table = self._map if self._map is not None else self._open()
        print_ = fingerprint(key)
        start = print_ % SLOTS
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # type: ignore[arg-type]
        try:
            offset, tat = self._find(table, print_, start, now)
            new_tat, decision = gcra(tat, now, rate)
            if new_tat is not None:
                SLOT.pack_into(table, offset, print_, new_tat)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # type: ignore[arg-type]
        return decision

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


# GCRA in Redis, on Redis's clock (servers' clocks may differ): KEYS[1] the bucket,
# ARGV emission interval and tolerance in seconds. Returns {allowed, ttl, wait} as strings.
_SCRIPT = """
local emission = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = (tonumber(clock[1]) - 1735689600) + tonumber(clock[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now or tat > now + tolerance + emission then tat = now end
local new_tat = tat + emission
local wait = (new_tat - tolerance) - now
if wait > 0 then
  return {'0', tostring(tat - now), tostring(wait)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1)
return {'1', tostring(new_tat - now), '-1'}
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

    async def take(self, key: bytes, rate: Rate) -> Decision:
        from redis.exceptions import RedisError

        try:
            allowed, ttl, wait = await self._script(keys=[b"grantkey:rl:" + key],
                                                    args=[repr(rate.emission), repr(rate.tolerance)])
        except (RedisError, OSError) as error:
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.warning("Redis unreachable, requests not rate limited: %s", error)
            return Decision(True, rate.limit, rate.burst, -1, 0.0)
        ttl_seconds = float(ttl)
        remaining = max(int((rate.tolerance - ttl_seconds) / rate.emission + 1e-9), 0)
        return Decision(allowed in (b"1", "1"), rate.limit, remaining,
                        float(wait), ttl_seconds)

    async def close(self) -> None:
        await self._client.aclose()
