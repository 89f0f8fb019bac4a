"""Does size cost speed? SQL API latency in an empty cluster and after it grew to 10,000
keys in the user and 1,000 users; server memory after 10,000 keys were each used once
(issue 5, targets 4 and 6).

Run: python bench/scale.py [--keys 10000] [--users 1000] [--duration 15] [--runs 3]
Target: latency in the full cluster no more than 10% above the empty one. Both are measured
in the same run, on the same server (--workers 2), with the same key and query: wrk 2
threads x 64 connections (req/s, p50, p99) and 500 sequential requests (median).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import httpx
from common import BenchServer, machine, write_result
from stream_memory import tree_rss
from throughput import lua, wrk

from grantkey.cli.embedded import EmbeddedPostgres
from grantkey.services.container import Services
from grantkey.settings import Settings

QUERY = "SELECT id FROM ten"
GRANTS = [{"type": "apis", "apis": ["sql"]}, {"type": "database", "tables": [
    {"schema": "public", "name": "ten", "permissions": ["select"]}]}]


def latency(server: BenchServer, token: str, duration: int, runs: int) -> dict[str, float]:
    url = f"{server.url}/user/bench/api/v2/sql?q={quote(QUERY)}"
    basic = base64.b64encode(f"bench:{token}".encode()).decode()
    script = lua(f'wrk.headers["Authorization"] = "Basic {basic}"\n')
    loads = [wrk(url, duration, script) for _ in range(runs)]
    with httpx.Client(auth=("bench", token), timeout=30) as http:
        for _ in range(50):
            http.get(url).raise_for_status()
        samples = []
        for _ in range(500):
            started = time.perf_counter()
            http.get(url).raise_for_status()
            samples.append((time.perf_counter() - started) * 1000)
    return {"rps": statistics.median(r["rps"] for r in loads),
            "p99_ms": statistics.median(r["p99_ms"] for r in loads),
            "non2xx": sum(r["non2xx"] for r in loads),
            "sequential_median_ms": statistics.median(samples)}


def create_keys(server: BenchServer, master: str, count: int, first: int = 0) -> list[str]:
    url = f"{server.url}/user/bench/api/v3/api_keys"

    def one(i: int) -> str:
        with httpx.Client(timeout=60) as http:
            response = http.post(url, params={"api_key": master},
                                 json={"name": f"s{i}", "grants": GRANTS})
            response.raise_for_status()
            return str(response.json()["token"])

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(first, first + count)))


async def create_users(server: BenchServer, count: int) -> None:
    embedded = EmbeddedPostgres(server.data_dir)
    settings = Settings(data_dir=server.data_dir, database_url=embedded.admin_url)
    services = Services(settings, embedded.admin_url)
    await services.open(migrate=False)
    try:
        names = iter(range(count))

        async def worker() -> None:
            for i in names:
                await services.users.create(f"other-{i}")
                if (i + 1) % 100 == 0:
                    print(f"  {i + 1} users", flush=True)

        await asyncio.gather(*(worker() for _ in range(4)))
    finally:
        await services.close()


def use_each_once(server: BenchServer, tokens: list[str]) -> int:
    url = f"{server.url}/user/bench/api/v2/sql"

    def one(chunk: list[str]) -> int:
        failures = 0
        with httpx.Client(timeout=60) as http:
            for token in chunk:
                if http.get(url, params={"q": QUERY, "api_key": token}).status_code != 200:
                    failures += 1
        return failures

    chunks = [tokens[i::8] for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(one, chunks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with BenchServer(workers=2, env={"GRANTKEY_SQL_MAX_CONNECTIONS": "40"}) as server:
        master = str(server.cli("users", "create", "bench")["master_token"])
        with httpx.Client(timeout=60) as http:
            http.post(f"{server.url}/user/bench/api/v2/sql", data={
                "api_key": master,
                "q": "CREATE TABLE ten AS SELECT g AS id FROM generate_series(1, 10) g",
            }).raise_for_status()
        (key,) = create_keys(server, master, 1)
        idle_rss = tree_rss(server.process.pid)
        empty = latency(server, key, args.duration, args.runs)
        print("empty cluster", empty, flush=True)
        started = time.monotonic()
        tokens = create_keys(server, master, args.keys - 1, first=1)
        keys_seconds = time.monotonic() - started
        print(f"{args.keys} keys in {keys_seconds:.0f} s", flush=True)
        started = time.monotonic()
        asyncio.run(create_users(server, args.users))
        users_seconds = time.monotonic() - started
        print(f"{args.users} more users in {users_seconds:.0f} s", flush=True)
        full = latency(server, key, args.duration, args.runs)
        print("full cluster", full, flush=True)
        before_use = tree_rss(server.process.pid)
        started = time.monotonic()
        failures = use_each_once(server, [key, *tokens])
        use_seconds = time.monotonic() - started
        after_use = tree_rss(server.process.pid)
    report(args, empty, full, {
        "idle": idle_rss, "before": before_use, "after": after_use}, failures,
        keys_seconds, users_seconds, use_seconds)


def report(args: argparse.Namespace, empty: dict[str, float], full: dict[str, float],
           rss: dict[str, int], failures: int, keys_seconds: float, users_seconds: float,
           use_seconds: float) -> None:
    def row(name: str, key: str, fmt: str) -> str:
        ratio = full[key] / empty[key]
        return f"| {name} | {empty[key]:{fmt}} | {full[key]:{fmt}} | {ratio:.2f} |"

    mb = {name: value / 2**20 for name, value in rss.items()}
    lines = [
        "# Scale: SQL API latency, empty cluster vs 10,000 keys and 1,000 users", "",
        *(f"- {k}: {v}" for k, v in machine().items()),
        f"- one server --workers 2, key-role connection cap 2 x 40; query `{QUERY}` with a "
        f"regular key in Basic auth; wrk -t2 -c64 -d{args.duration}s, medians of {args.runs} "
        "runs; 500 sequential requests", "",
        f"- filled: {args.keys:,} keys in the user ({keys_seconds:.0f} s), {args.users:,} "
        f"more users ({users_seconds:.0f} s)", "",
        "| measure | empty cluster | full cluster | full / empty |", "|---|---|---|---|",
        row("req/s (wrk)", "rps", ",.0f"), row("p99 ms (wrk)", "p99_ms", ".2f"),
        row("sequential median ms", "sequential_median_ms", ".2f"),
        f"| non-2xx | {empty['non2xx']:.0f} | {full['non2xx']:.0f} | |", "",
        "Server memory (RSS of grantkey's processes, PostgreSQL excluded):", "",
        "| when | MB |", "|---|---|",
        f"| idle, after start-up and the first key | {mb['idle']:.1f} |",
        f"| after the load runs, before the keys were used | {mb['before']:.1f} |",
        f"| after each of the {args.keys:,} keys was used once ({use_seconds:.0f} s, "
        f"{failures} failures) | {mb['after']:.1f} |",
    ]
    write_result("scale", lines)


if __name__ == "__main__":
    main()
