"""A flood of slow anonymous requests: are the master, other keys and other users still
served? (issue 11, acceptance 3)

`grantkey serve --workers 2` on a fresh embedded cluster. First without a flood, then
during one: `--flood` anonymous `SELECT pg_sleep(15)` requests at once on one user, while
the user's master, one of its regular keys and another user's anonymous client each send
`SELECT 1` one after the other for `--seconds`. Reported side by side: their statuses and
p50/p99 latency, and the flood's own statuses.

    .venv/bin/python bench/flood.py [--flood 300] [--seconds 12] [--cap N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import BenchServer, machine, write_result


def probe(url: str, params: dict[str, str], seconds: float) -> tuple[Counter[int], list[float]]:
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    with httpx.Client(timeout=30) as http:
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            started = time.monotonic()
            try:
                statuses[http.get(url, params=params).status_code] += 1
            except httpx.HTTPError:
                statuses[0] += 1
            latencies.append(time.monotonic() - started)
    return statuses, latencies


def measure(probes: dict[str, tuple[str, dict[str, str]]],
            seconds: float) -> dict[str, tuple[Counter[int], list[float]]]:
    results: dict[str, tuple[Counter[int], list[float]]] = {}

    def run(name: str) -> None:
        results[name] = probe(*probes[name], seconds)

    threads = [threading.Thread(target=run, args=(name,)) for name in probes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


async def flood(url: str, count: int) -> Counter[int]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        async def one() -> int:
            try:
                return (await http.get(url, params={"q": "SELECT pg_sleep(15)"})).status_code
            except httpx.HTTPError:
                return 0
        return Counter(await asyncio.gather(*(one() for _ in range(count))))


def row(name: str, result: tuple[Counter[int], list[float]]) -> str:
    statuses, latencies = result
    ordered = sorted(latencies)
    p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)]
    return (f"{name} | {sum(statuses.values())} | {dict(statuses)} | "
            f"{statistics.median(ordered) * 1000:.1f} | {p99 * 1000:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--cap", type=int, default=None)
    args = parser.parse_args()
    env = {k: "" for k in os.environ if k.startswith("GRANTKEY_")}
    if args.cap is not None:
        env["GRANTKEY_SQL_MAX_CONNECTIONS"] = str(args.cap)
    with BenchServer(workers=2, env=env) as server:
        master = str(server.cli("users", "create", "busy")["master_token"])
        server.cli("users", "create", "neighbour")
        sql = f"{server.url}/user/busy/api/v2/sql"
        with httpx.Client(timeout=30) as http:
            key = http.post(f"{server.url}/user/busy/api/v3/api_keys",
                            params={"api_key": master},
                            json={"name": "app", "grants": [{"type": "apis", "apis": ["sql"]}]})
            token = key.json()["token"]
        probes = {"master": (sql, {"q": "SELECT 1", "api_key": master}),
                  "regular key": (sql, {"q": "SELECT 1", "api_key": token}),
                  "another user, no key": (f"{server.url}/user/neighbour/api/v2/sql",
                                           {"q": "SELECT 1"})}
        quiet = measure(probes, args.seconds)
        flood_result: list[Counter[int]] = []
        flooding = threading.Thread(target=lambda: flood_result.append(
            asyncio.run(flood(sql, args.flood))))
        flooding.start()
        time.sleep(2)  # the flood is in
        busy = measure(probes, args.seconds)
        flooding.join()
        log = (server.data_dir / "serve.log").read_text(errors="replace")
        cap_line = next((line for line in log.splitlines() if "max_connections" in line), "")
    lines = ["# A flood of slow anonymous requests", "",
             *(f"- {k}: {v}" for k, v in machine().items()),
             f"- `serve --workers 2`; {cap_line or 'cap ' + str(args.cap)}; key share 0.5, user "
             "share 0.75 (defaults)",
             f"- flood: {args.flood} anonymous `SELECT pg_sleep(15)` at once on user `busy`; "
             f"its statuses: {dict(flood_result[0]) if flood_result else '?'}",
             f"- probes: `SELECT 1` one after the other for {args.seconds:g} s each", "",
             "| client | without the flood: requests | statuses | p50 ms | p99 ms | "
             "during the flood: requests | statuses | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in probes:
        lines.append(f"| {row(name, quiet[name])} | {row(name, busy[name]).split(' | ', 1)[1]} |")
    write_result("flood" if args.cap is None else f"flood-cap{args.cap}", lines)


if __name__ == "__main__":
    main()
