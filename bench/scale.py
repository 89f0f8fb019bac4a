"""Does size cost speed? SQL API latency in an empty cluster and in one that grew to
10,000 keys in the user and 1,000 users; server memory after 10,000 keys were each used once
(issue 5, targets 4 and 6).

Run: python bench/scale.py [--keys 10000] [--users 1000] [--duration 15] [--runs 3]
     [--settle 60]
Target: latency in the full cluster no more than 10% above the empty one. Two servers
(--workers 2 each, each on its own embedded PostgreSQL) run side by side: one stays empty,
the other is filled. After `--settle` seconds both are measured in alternating rounds with
the same key grants and query: wrk 2 threads x 64 connections (req/s, p99), then blocks of
sequential requests (median); ratios are taken within each round, so a host that steals
CPU time unevenly affects both sides alike. Also reported: processes started per second in
the idle machine (PostgreSQL's autovacuum launcher starts one worker per database every
autovacuum_naptime / databases seconds).
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


def sql_url(server: BenchServer) -> str:
    return f"{server.url}/user/bench/api/v2/sql?q={quote(QUERY)}"


def load(server: BenchServer, token: str, duration: int) -> dict[str, float]:
    basic = base64.b64encode(f"bench:{token}".encode()).decode()
    script = lua(f'wrk.headers["Authorization"] = "Basic {basic}"\n')
    return wrk(sql_url(server), duration, script)


def sequential(server: BenchServer, token: str, count: int) -> list[float]:
    with httpx.Client(auth=("bench", token), timeout=30) as http:
        for _ in range(20):
            http.get(sql_url(server)).raise_for_status()
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            http.get(sql_url(server)).raise_for_status()
            samples.append((time.perf_counter() - started) * 1000)
    return samples


def side_by_side(sides: dict[str, tuple[BenchServer, str]],
                 args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Alternating rounds; `*_ratio` are medians of full / empty within each round."""
    loads: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    samples: dict[str, list[float]] = {name: [] for name in sides}
    block_medians: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for number in range(args.runs):
        for name in names if number % 2 == 0 else names[::-1]:
            server, token = sides[name]
            loads[name].append(load(server, token, args.duration))
            block = sequential(server, token, 500 // args.runs)
            samples[name].extend(block)
            block_medians[name].append(statistics.median(block))
            print(name, loads[name][-1], f"sequential {block_medians[name][-1]:.2f} ms",
                  flush=True)
    result = {name: {"rps": statistics.median(r["rps"] for r in loads[name]),
                     "p99_ms": statistics.median(r["p99_ms"] for r in loads[name]),
                     "non2xx": sum(r["non2xx"] for r in loads[name]),
                     "sequential_median_ms": statistics.median(samples[name])}
              for name in sides}
    empty, full = names
    for key, series in (("rps", loads), ("p99_ms", loads)):
        result[full][f"{key}_ratio"] = statistics.median(
            f[key] / e[key] for f, e in zip(series[full], series[empty], strict=True))
    result[full]["sequential_median_ms_ratio"] = statistics.median(
        f / e for f, e in zip(block_medians[full], block_medians[empty], strict=True))
    return result


def processes_started_per_second(seconds: float = 10.0) -> float:
    """Forks in the whole machine per second (the `processes` line of /proc/stat)."""
    def forks() -> int:
        with open("/proc/stat") as stat:
            return next(int(line.split()[1]) for line in stat if line.startswith("processes"))

    before = forks()
    time.sleep(seconds)
    return (forks() - before) / seconds


def prepare(server: BenchServer) -> tuple[str, str]:
    """The user `bench`, a 10-row table, and one regular key that may read it."""
    master = str(server.cli("users", "create", "bench")["master_token"])
    with httpx.Client(timeout=60) as http:
        http.post(f"{server.url}/user/bench/api/v2/sql", data={
            "api_key": master,
            "q": "CREATE TABLE ten AS SELECT g AS id FROM generate_series(1, 10) g",
        }).raise_for_status()
    (key,) = create_keys(server, master, 1)
    return master, key


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
    settings = Settings(data_dir=server.data_dir, database_url=embedded.admin_url,
                        superuser_url=embedded.superuser_url)
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
    parser.add_argument("--settle", type=int, default=60)
    args = parser.parse_args()
    env = {"GRANTKEY_SQL_MAX_CONNECTIONS": "40"}
    with BenchServer(workers=2, env=env) as empty, BenchServer(workers=2, env=env) as full:
        _, empty_key = prepare(empty)
        master, key = prepare(full)
        idle_rss = tree_rss(full.process.pid)
        forks_before = processes_started_per_second()
        started = time.monotonic()
        tokens = create_keys(full, master, args.keys - 1, first=1)
        keys_seconds = time.monotonic() - started
        print(f"{args.keys} keys in {keys_seconds:.0f} s", flush=True)
        started = time.monotonic()
        asyncio.run(create_users(full, args.users))
        users_seconds = time.monotonic() - started
        print(f"{args.users} more users in {users_seconds:.0f} s; settling {args.settle} s",
              flush=True)
        time.sleep(args.settle)
        forks_after = processes_started_per_second()
        measured = side_by_side({"empty": (empty, empty_key), "full": (full, key)}, args)
        before_use = tree_rss(full.process.pid)
        started = time.monotonic()
        failures = use_each_once(full, [key, *tokens])
        use_seconds = time.monotonic() - started
        after_use = tree_rss(full.process.pid)
    report(args, measured, {"idle": idle_rss, "before": before_use, "after": after_use},
           {"before": forks_before, "after": forks_after}, failures,
           (keys_seconds, users_seconds, use_seconds))


def report(args: argparse.Namespace, measured: dict[str, dict[str, float]],
           rss: dict[str, int], forks: dict[str, float], failures: int,
           seconds: tuple[float, float, float]) -> None:
    empty, full = measured["empty"], measured["full"]
    keys_seconds, users_seconds, use_seconds = seconds

    def row(name: str, key: str, fmt: str) -> str:
        return (f"| {name} | {empty[key]:{fmt}} | {full[key]:{fmt}} | "
                f"{full[key + '_ratio']:.2f} |")

    mb = {name: value / 2**20 for name, value in rss.items()}
    lines = [
        "# Scale: SQL API latency, empty cluster vs 10,000 keys and 1,000 users", "",
        *(f"- {k}: {v}" for k, v in machine().items()),
        f"- two servers side by side (each --workers 2, key-role connection cap 2 x 40, own "
        f"embedded PostgreSQL); query `{QUERY}` with a regular key in Basic auth; "
        f"{args.runs} alternating rounds of wrk -t2 -c64 -d{args.duration}s and "
        f"{500 // args.runs} sequential requests; values are medians, full / empty the "
        "median of the ratios within each round", "",
        f"- filled: {args.keys:,} keys in the user ({keys_seconds:.0f} s), {args.users:,} "
        f"more users ({users_seconds:.0f} s), then {args.settle} s to settle", "",
        "| measure | empty cluster | full cluster | full / empty |", "|---|---|---|---|",
        row("req/s (wrk)", "rps", ",.0f"), row("p99 ms (wrk)", "p99_ms", ".2f"),
        row("sequential median ms", "sequential_median_ms", ".2f"),
        f"| non-2xx | {empty['non2xx']:.0f} | {full['non2xx']:.0f} | |", "",
        f"Processes started per second, machine idle: {forks['before']:.1f} before the "
        f"filling, {forks['after']:.1f} after (PostgreSQL's autovacuum workers).", "",
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
