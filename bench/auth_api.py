"""Auth API latency (issue 5, 4): key creation with 10 table grants; listing 20 keys of a
user who has many keys.

Run: python bench/auth_api.py [--keys 10000] [--samples 100]
Targets: creation ≤ 50 ms median; listing 20 of 10,000 keys ≤ 20 ms median.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
from common import BenchServer, machine, write_result


def timed(call: object) -> float:
    started = time.perf_counter()
    call()  # type: ignore[operator]
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    with BenchServer(workers=1) as server:
        master = str(server.cli("users", "create", "bench")["master_token"])
        http = httpx.Client(timeout=60)
        sql = f"{server.url}/user/bench/api/v2/sql"
        keys = f"{server.url}/user/bench/api/v3/api_keys"
        http.post(sql, data={"api_key": master, "q": "; ".join(
            f"CREATE TABLE t{i} (id serial PRIMARY KEY)" for i in range(10))})
        ten = [{"type": "apis", "apis": ["sql"]}, {"type": "database", "tables": [
            {"schema": "public", "name": f"t{i}", "permissions": ["select", "insert"]}
            for i in range(10)]}]
        creation = [timed(lambda i=i: http.post(keys, params={"api_key": master}, json={
            "name": f"ten-{i}", "grants": ten}).raise_for_status()) for i in range(args.samples)]
        one = [{"type": "apis", "apis": ["sql"]}, {"type": "database", "tables": [
            {"schema": "public", "name": "t0", "permissions": ["select"]}]}]
        started = time.monotonic()
        for i in range(args.keys - args.samples):
            http.post(keys, params={"api_key": master},
                      json={"name": f"k{i}", "grants": one}).raise_for_status()
        fill_seconds = time.monotonic() - started
        last_page = args.keys // 20
        first = [timed(lambda: http.get(keys, params={"api_key": master, "per_page": 20}
                                        ).raise_for_status()) for _ in range(args.samples)]
        deep = [timed(lambda: http.get(keys, params={"api_key": master, "per_page": 20,
                                                     "page": last_page}).raise_for_status())
                for _ in range(args.samples)]
    lines = ["# Auth API latency (over HTTP, one worker)", "",
             *(f"- {k}: {v}" for k, v in machine().items()), "",
             f"- create a key with 10 table grants: {statistics.median(creation):.1f} ms median "
             f"of {args.samples} (target ≤ 50 ms)",
             f"- filling the user to {args.keys:,} keys took {fill_seconds:.0f} s "
             f"({fill_seconds / max(1, args.keys - args.samples) * 1000:.1f} ms per key)",
             f"- list 20 keys of {args.keys:,}, first page: {statistics.median(first):.1f} ms "
             f"median; page {last_page}: {statistics.median(deep):.1f} ms median (target ≤ 20 ms)"]
    write_result("auth-api", lines)


if __name__ == "__main__":
    main()
