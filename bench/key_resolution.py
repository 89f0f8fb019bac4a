"""Key resolution (token -> principal) in-process: cached, and uncached among 1,000,000 keys.

Run: python bench/key_resolution.py [--keys 1000000]
Targets (issue 5, 3): cached ≤ 20 µs median; uncached ≤ 2 ms median with 1,000,000 keys.
The million rows are inserted straight into the user's key table (random digests, no
roles): resolution reads that table only.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, write_result

from grantkey.cli.embedded import EmbeddedPostgres
from grantkey.services.container import Services
from grantkey.settings import Settings

FILLER = """
INSERT INTO grantkey_meta.api_keys (id, name, type, role, token_digest, apis)
SELECT 'f' || g, 'filler-' || g, 'regular', 'gk_filler_' || g, sha256(('t' || g)::bytea), '{sql}'
FROM generate_series(1, %s) AS g
"""


async def measure(services: Services, keys: int) -> dict[str, float]:
    created = await services.users.create("resolver")
    user, token = created.user, created.master_token
    async with services.cluster.user_database(user.database) as conn:
        await conn.execute(FILLER, [keys])
    async with services.cluster.autocommit(user.database) as conn:
        await conn.execute("VACUUM ANALYZE grantkey_meta.api_keys")
    await services.resolver.resolve(user, token, fresh=False)
    cached = []
    for _ in range(200):
        started = time.perf_counter_ns()
        for _ in range(100):
            await services.resolver.resolve(user, token, fresh=False)
        cached.append((time.perf_counter_ns() - started) / 100 / 1000)
    uncached = []
    for _ in range(1000):
        started = time.perf_counter_ns()
        await services.resolver.resolve(user, token, fresh=True)
        uncached.append((time.perf_counter_ns() - started) / 1000)
    await services.users.delete("resolver")
    return {"cached_us": statistics.median(cached), "uncached_us": statistics.median(uncached),
            "uncached_p99_us": sorted(uncached)[int(len(uncached) * 0.99)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=1_000_000)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="gkbench-"))
    embedded = EmbeddedPostgres(data_dir)
    embedded.start()
    try:
        settings = Settings(data_dir=data_dir, database_url=embedded.admin_url,
                            superuser_url=embedded.superuser_url)
        services = Services(settings, embedded.admin_url)

        async def run() -> dict[str, float]:
            await services.open()
            try:
                return await measure(services, args.keys)
            finally:
                await services.close()

        result = asyncio.run(run())
    finally:
        embedded.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    lines = ["# Key resolution", "", *(f"- {k}: {v}" for k, v in machine().items()), "",
             f"- keys in the user's table: {args.keys:,} (+2 built-in)",
             f"- cached: {result['cached_us']:.1f} µs median (target ≤ 20 µs)",
             f"- uncached: {result['uncached_us']:.0f} µs median, "
             f"{result['uncached_p99_us']:.0f} µs p99 (target ≤ 2,000 µs)"]
    write_result("key-resolution", lines)


if __name__ == "__main__":
    main()
