"""Batch jobs: 1,000 one-statement jobs from 10 users through 2 runners (issue 14, speed).

Run: python bench/jobs.py [--users 10] [--jobs 100] [--runs 3]

A server with 2 workers, each running one job at a time (GRANTKEY_JOB_RUNNERS=1). Each of
`--users` users has a regular key (sql, INSERT on its table); all the jobs (`INSERT INTO t
VALUES (…)`) are created at once (8 client threads), then the run waits until every one has
ended. Reported: jobs/s from the first creation to the last end; the time from a job's
creation to its start (PostgreSQL's clocks: `started_at - created_at`), p50 and p99, which
here is mostly queueing (1,000 jobs, 2 runners); and, on an idle queue, a single job's
creation to start (the NOTIFY that wakes a runner), p50 and p99 of 20.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
from common import BenchServer, machine, write_result

from grantkey.cli.embedded import EmbeddedPostgres


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def setup(server: BenchServer, users: int) -> list[tuple[str, str]]:
    """(username, key token) for each user, its table made."""
    made = []
    embedded = EmbeddedPostgres(server.data_dir)
    for number in range(users):
        name = f"bench{number}"
        master = str(server.cli("users", "create", name)["master_token"])
        httpx.get(f"{server.url}/user/{name}/api/v2/sql", timeout=30, params={
            "api_key": master, "q": "CREATE TABLE t (n int)"}).raise_for_status()
        key = httpx.post(f"{server.url}/user/{name}/api/v3/api_keys", params={"api_key": master},
                         timeout=30, json={"name": "jobs", "grants": [
                             {"type": "apis", "apis": ["sql"]},
                             {"type": "database", "tables": [
                                 {"schema": "public", "name": "t", "permissions": ["insert"]}]}]})
        made.append((name, str(key.json()["token"])))
    del embedded
    return made


def timings(server: BenchServer, ids: list[str]) -> list[tuple[float, float, float]]:
    """(created, started, ended) epoch seconds of each job, PostgreSQL's clock."""
    embedded = EmbeddedPostgres(server.data_dir)
    with psycopg.connect(embedded.admin_url, dbname="grantkey") as conn:
        return [(float(a), float(b), float(c)) for a, b, c in conn.execute(
            "SELECT extract(epoch FROM created_at), extract(epoch FROM started_at), "
            "extract(epoch FROM ended_at) FROM public.batch_jobs WHERE id = ANY(%s::uuid[])",
            [ids]).fetchall()]


def wait_done(server: BenchServer, ids: list[str]) -> None:
    embedded = EmbeddedPostgres(server.data_dir)
    with psycopg.connect(embedded.admin_url, dbname="grantkey", autocommit=True) as conn:
        while True:
            left, failed = conn.execute(
                "SELECT count(*) FILTER (WHERE status IN ('pending', 'running')), "
                "count(*) FILTER (WHERE status <> 'done' AND status NOT IN ('pending', "
                "'running')) FROM public.batch_jobs WHERE id = ANY(%s::uuid[])",
                [ids]).fetchone() or (0, 0)
            assert failed == 0, f"{failed} jobs did not end done"
            if left == 0:
                return
            time.sleep(0.05)


def burst(server: BenchServer, keys: list[tuple[str, str]], per_user: int) -> dict[str, float]:
    def create(args: tuple[str, str, int]) -> str:
        name, token, number = args
        answer = httpx.post(f"{server.url}/user/{name}/api/v2/sql/job", timeout=60, json={
            "api_key": token, "query": f"INSERT INTO t VALUES ({number})"})
        answer.raise_for_status()
        return str(answer.json()["job_id"])

    work = [(name, token, n) for n in range(per_user) for name, token in keys]
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(create, work))
    wait_done(server, ids)
    found = timings(server, ids)
    waits = [started - created for created, started, _ in found]
    span = max(ended for *_, ended in found) - min(created for created, *_ in found)
    return {"jobs": len(ids), "jobs_per_s": len(ids) / span, "p50_ms": 1000 * percentile(waits, 0.5),
            "p99_ms": 1000 * percentile(waits, 0.99)}


def idle_start(server: BenchServer, key: tuple[str, str], count: int = 20) -> dict[str, float]:
    name, token = key
    ids = []
    for number in range(count):
        answer = httpx.post(f"{server.url}/user/{name}/api/v2/sql/job", timeout=60, json={
            "api_key": token, "query": f"INSERT INTO t VALUES ({number})"})
        ids.append(str(answer.json()["job_id"]))
        wait_done(server, ids[-1:])
    waits = [started - created for created, started, _ in timings(server, ids)]
    return {"p50_ms": 1000 * percentile(waits, 0.5), "p99_ms": 1000 * percentile(waits, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=100, help="jobs per user")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    bursts, idles = [], []
    with BenchServer(workers=2, env={"GRANTKEY_JOB_RUNNERS": "1"}) as server:
        keys = setup(server, args.users)
        for number in range(args.runs):
            bursts.append(burst(server, keys, args.jobs))
            idles.append(idle_start(server, keys[0]))
            print(number, bursts[-1], idles[-1], flush=True)
    lines = ["# Batch jobs: a burst through 2 runners, and one job on an idle queue", "",
             *(f"- {k}: {v}" for k, v in machine().items()),
             f"- {args.users} users x {args.jobs} one-statement jobs (INSERT, a regular key "
             "each), created at once by 8 client threads; `grantkey serve --workers 2`, "
             f"GRANTKEY_JOB_RUNNERS=1 (2 runners); {args.runs} runs, medians; times from "
             "PostgreSQL's clock (created_at, started_at, ended_at)", "",
             "| measure | value |", "|---|---|",
             f"| jobs | {bursts[0]['jobs']:.0f} |",
             f"| jobs/s (first creation to last end) | "
             f"{statistics.median(b['jobs_per_s'] for b in bursts):.1f} |",
             f"| burst: creation to start p50 ms | "
             f"{statistics.median(b['p50_ms'] for b in bursts):.0f} |",
             f"| burst: creation to start p99 ms | "
             f"{statistics.median(b['p99_ms'] for b in bursts):.0f} |",
             f"| idle queue: creation to start p50 ms (20 jobs one by one) | "
             f"{statistics.median(i['p50_ms'] for i in idles):.1f} |",
             f"| idle queue: creation to start p99 ms | "
             f"{statistics.median(i['p99_ms'] for i in idles):.1f} |"]
    write_result("jobs", lines)


if __name__ == "__main__":
    main()
