"""A steady mixed load for a long time, with key churn: does anything grow or break?

`grantkey serve --workers 2` on a fresh embedded cluster. Client threads send a mixed load
(inserts as the master, reads with regular keys and with no key); one more thread churns
keys: creates one, uses it, deletes or regenerates it, and checks the old token is refused
at once, again and again. Every `--every` seconds: req/s, statuses, p50/p99, RSS of each
server process, PostgreSQL backends, open files. At the end: acknowledged inserts missing,
old tokens accepted, 5xx, and RSS growth per worker per hour after the first 5 minutes.

    .venv/bin/python bench/soak.py [--minutes 20] [--clients 6] [--every 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).parent))
from common import BenchServer, machine, write_result
from faults import children

from grantkey.cli.embedded import EmbeddedPostgres


class Soak:
    def __init__(self, server: BenchServer, master: str, readers: list[str]) -> None:
        self.server, self.master, self.readers = server, master, readers
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.acked: set[int] = set()
        self.next = 0
        self.old_accepted = 0
        self.old_checked = 0
        self.stop = threading.Event()

    def client(self, index: int) -> None:
        sql = f"{self.server.url}/user/bench/api/v2/sql"
        with httpx.Client(timeout=30) as http:
            turn = index
            while not self.stop.is_set():
                kind = turn % 3
                turn += 1
                number = None
                if kind == 0:
                    with self.lock:
                        self.next += 1
                        number = self.next
                    params = {"q": f"INSERT INTO acks VALUES ({number})", "api_key": self.master}
                elif kind == 1:
                    params = {"q": "SELECT * FROM cities LIMIT 10",
                              "api_key": self.readers[turn % len(self.readers)]}
                else:
                    params = {"q": "SELECT count(*) FROM cities"}
                started = time.monotonic()
                try:
                    status = http.get(sql, params=params).status_code
                except httpx.HTTPError:
                    status = 0
                with self.lock:
                    self.latencies.append(time.monotonic() - started)
                    self.statuses[status] += 1
                    if number is not None and status == 200:
                        self.acked.add(number)

    def churn(self) -> None:
        keys = f"{self.server.url}/user/bench/api/v3/api_keys"
        sql = f"{self.server.url}/user/bench/api/v2/sql"
        grants = [{"type": "apis", "apis": ["sql"]}]
        with httpx.Client(timeout=30) as http:
            number = 0
            while not self.stop.is_set():
                number += 1
                name = f"churn{number}"
                made = http.post(keys, params={"api_key": self.master},
                                 json={"name": name, "grants": grants})
                if made.status_code != 201:
                    continue
                old = made.json()["token"]
                http.get(sql, params={"q": "SELECT 1", "api_key": old})
                if number % 2:
                    http.delete(f"{keys}/{name}", params={"api_key": self.master})
                    current = None
                else:
                    current = http.post(f"{keys}/{name}/token/regenerate",
                                        params={"api_key": self.master}).json().get("token")
                accepted = http.get(sql, params={"q": "SELECT 1", "api_key": old})
                with self.lock:
                    self.old_checked += 1
                    self.old_accepted += accepted.status_code == 200
                if current is not None:
                    http.delete(f"{keys}/{name}", params={"api_key": self.master})

    def sample(self) -> tuple[list[float], Counter[int]]:
        with self.lock:
            latencies, statuses = self.latencies, self.statuses
            self.latencies, self.statuses = [], Counter()
        return latencies, statuses


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def backends(admin_url: str) -> int:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        (count,) = conn.execute("SELECT count(*) FROM pg_stat_activity "
                                "WHERE backend_type = 'client backend'").fetchone()
    return int(count)


def setup(server: BenchServer) -> tuple[str, list[str]]:
    master = str(server.cli("users", "create", "bench")["master_token"])
    with httpx.Client(timeout=60) as http:
        sql = f"{server.url}/user/bench/api/v2/sql"
        http.get(sql, params={"api_key": master, "q":
                 "CREATE TABLE acks (n int PRIMARY KEY); CREATE TABLE cities (name text);"
                 "INSERT INTO cities SELECT 'c' || g FROM generate_series(1, 100) g;"
                 "GRANT SELECT ON cities TO PUBLIC"}).raise_for_status()
        grants = [{"type": "apis", "apis": ["sql"]}, {"type": "database", "tables": [
            {"schema": "public", "name": "cities", "permissions": ["select"]}]}]
        readers = [http.post(f"{server.url}/user/bench/api/v3/api_keys",
                             params={"api_key": master},
                             json={"name": f"r{i}", "grants": grants}).json()["token"]
                   for i in range(20)]
    return master, readers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--every", type=float, default=30)
    args = parser.parse_args()
    env = {k: "" for k in os.environ if k.startswith("GRANTKEY_")}
    lines = ["# Soak: steady mixed load with key churn", "",
             *(f"- {k}: {v}" for k, v in machine().items()),
             f"- {args.minutes:g} minutes, `serve --workers 2`, {args.clients} client threads "
             "(inserts as the master, reads with 20 regular keys and with no key) and one key "
             "churn thread (create, use, delete or regenerate, check the old token)", "",
             "| minute | req/s | 200 | other statuses | p50 ms | p99 ms | RSS MiB per process "
             "| backends | open files |", "|---|---|---|---|---|---|---|---|---|"]
    with BenchServer(workers=2, env=env) as server:
        master, readers = setup(server)
        admin = EmbeddedPostgres(server.data_dir).admin_url
        soak = Soak(server, master, readers)
        threads = [threading.Thread(target=soak.client, args=(i,), daemon=True)
                   for i in range(args.clients)]
        threads.append(threading.Thread(target=soak.churn, daemon=True))
        for thread in threads:
            thread.start()
        started = time.monotonic()
        rss_history: dict[int, list[tuple[float, int]]] = {}
        total: Counter[int] = Counter()
        while time.monotonic() - started < args.minutes * 60:
            time.sleep(args.every)
            latencies, statuses = soak.sample()
            total.update(statuses)
            elapsed = time.monotonic() - started
            processes = [server.process.pid, *children(server.process.pid)]
            rss = {pid: rss_kib(pid) for pid in processes}
            for pid, kib in rss.items():
                rss_history.setdefault(pid, []).append((elapsed, kib))
            ordered = sorted(latencies) or [0.0]
            other = {k: v for k, v in statuses.items() if k != 200}
            lines.append(
                f"| {elapsed / 60:.1f} | {len(latencies) / args.every:,.0f} | "
                f"{statuses[200]:,} | {other or '—'} | "
                f"{statistics.median(ordered) * 1000:.1f} | "
                f"{ordered[int(len(ordered) * 0.99) - 1 if len(ordered) > 1 else 0] * 1000:.1f} | "
                f"{' / '.join(f'{kib / 1024:.0f}' for kib in rss.values())} | "
                f"{backends(admin)} | {sum(open_files(p) for p in processes)} |")
            print(lines[-1], flush=True)
        soak.stop.set()
        for thread in threads:
            thread.join(60)
        with httpx.Client(timeout=60) as http:
            rows = http.get(f"{server.url}/user/bench/api/v2/sql", params={
                "api_key": master, "q": "SELECT n FROM acks"}).json()["rows"]
        missing = len(soak.acked - {row["n"] for row in rows})
    growth = []
    for pid, history in rss_history.items():
        after = [(t, kib) for t, kib in history if t >= 300]
        if len(after) >= 2:
            (t0, r0), (t1, r1) = after[0], after[-1]
            growth.append(f"{pid}: {(r1 - r0) / 1024 / ((t1 - t0) / 3600):+.1f} MiB/h")
    lines += ["", f"- requests: {sum(total.values()):,}; statuses: {dict(total)}; 5xx: "
              f"{sum(v for k, v in total.items() if k >= 500)}",
              f"- old tokens accepted after delete or regenerate: {soak.old_accepted} of "
              f"{soak.old_checked}",
              f"- acknowledged inserts: {len(soak.acked):,}; missing: {missing}",
              f"- RSS growth after the first 5 minutes: {', '.join(growth) or 'run longer'}"]
    write_result("soak", lines)


if __name__ == "__main__":
    main()
