"""Revocation on a --workers 2 server, over many trials (issue 5, 5).

Run: python bench/revocation.py [--trials 100] [--sleep-trials 20]
Reports DELETE latency (median), how often the old token is refused on the very next
requests (new connections, so both workers answer), and how long after DELETE returns a
running `pg_sleep(30)` of the revoked key ends (median and max).
Targets: DELETE median ≤ 20 ms; refused every time; running query ends ≤ 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import httpx
from common import BenchServer, machine, write_result

GRANTS = [{"type": "apis", "apis": ["sql"]}]


def fresh_status(url: str, token: str) -> int:
    with httpx.Client(timeout=30, headers={"Connection": "close"}) as http:
        return http.get(url, params={"q": "SELECT 1", "api_key": token}).status_code


def sleep_with(sql: str, token: str, ended: list[float]) -> None:
    httpx.get(sql, params={"q": "SELECT pg_sleep(30)", "api_key": token}, timeout=60)
    ended.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--sleep-trials", type=int, default=20)
    args = parser.parse_args()
    with BenchServer(workers=2) as server:
        master = str(server.cli("users", "create", "bench")["master_token"])
        keys = f"{server.url}/user/bench/api/v3/api_keys"
        sql = f"{server.url}/user/bench/api/v2/sql"
        http = httpx.Client(timeout=60)
        delete_ms, refused, ends = [], 0, []
        for trial in range(args.trials):
            token = http.post(keys, params={"api_key": master},
                              json={"name": f"r{trial}", "grants": GRANTS}).json()["token"]
            for _ in range(4):  # warm both workers' caches and pools
                fresh_status(sql, token)
            started = time.perf_counter()
            http.delete(f"{keys}/r{trial}", params={"api_key": master})
            delete_ms.append((time.perf_counter() - started) * 1000)
            if all(fresh_status(sql, token) == 401 for _ in range(2)):
                refused += 1
        for trial in range(args.sleep_trials):
            token = http.post(keys, params={"api_key": master},
                              json={"name": f"s{trial}", "grants": GRANTS}).json()["token"]
            ended: list[float] = []
            sleeper = threading.Thread(target=sleep_with, args=(sql, token, ended))
            sleeper.start()
            time.sleep(0.5)
            http.delete(f"{keys}/s{trial}", params={"api_key": master})
            returned = time.perf_counter()
            sleeper.join()
            ends.append((ended[0] - returned) * 1000)
    lines = ["# Revocation (--workers 2)", "", *(f"- {k}: {v}" for k, v in machine().items()),
             "", f"- DELETE latency: {statistics.median(delete_ms):.1f} ms median, "
                 f"{max(delete_ms):.1f} ms max over {args.trials} trials (target ≤ 20 ms median)",
             f"- old token refused on the next two requests (new connections): {refused}/"
             f"{args.trials} (target: every time)",
             f"- running pg_sleep(30) ended after DELETE returned: "
             f"{statistics.median(ends):.0f} ms median, {max(ends):.0f} ms max over "
             f"{args.sleep_trials} trials (target ≤ 1,000 ms)"]
    write_result("revocation", lines)


if __name__ == "__main__":
    main()
