"""Peak server memory while streaming a 1,000,000-row answer as JSON and as CSV.

Run: python bench/stream_memory.py [--rows 1000000] [--runs 3]
Target (issue 3 / issue 5): peak RSS ≤ 50 MB above idle.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import httpx
import psutil
from common import BenchServer, machine, write_result

QUERY = ("SELECT g AS id, md5(g::text) AS name, g * 1.5 AS value, now() AS at "
         "FROM generate_series(1, {rows}) AS g")


def tree_rss(pid: int) -> int:
    """RSS of the server process and its children (workers), PostgreSQL excluded."""
    root = psutil.Process(pid)
    total = root.memory_info().rss
    for child in root.children(recursive=True):
        if "postgres" not in child.name():
            total += child.memory_info().rss
    return total


def stream_once(server: BenchServer, url: str, token: str, fmt: str, rows: int) -> dict[str, float]:
    idle = tree_rss(server.process.pid)
    peak = idle
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(server.process.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    size = 0
    with httpx.stream("GET", url, params={"q": QUERY.format(rows=rows), "api_key": token,
                                          "format": fmt}, timeout=300) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            size += len(chunk)
    elapsed = time.monotonic() - started
    done.set()
    sampler.join()
    return {"idle_mb": idle / 2**20, "peak_mb": peak / 2**20,
            "delta_mb": (peak - idle) / 2**20, "seconds": elapsed, "mb": size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    # a generous time limit: this measures memory, not the limit
    with BenchServer(env={"GRANTKEY_SQL_MASTER_TIMEOUT": "600"}) as server:
        created = server.cli("users", "create", "bench")
        token = str(created["master_token"])
        url = f"{server.url}/user/bench/api/v2/sql"
        results = {}
        for fmt in ("json", "csv"):
            runs = [stream_once(server, url, token, fmt, args.rows) for _ in range(args.runs)]
            results[fmt] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            results[fmt]["max_delta_mb"] = max(r["delta_mb"] for r in runs)
    lines = ["# Streaming memory", "", *(f"- {k}: {v}" for k, v in machine().items()),
             f"- rows: {args.rows:,}, runs per format: {args.runs} (medians)", "",
             "| format | idle RSS MB | peak RSS MB | peak − idle MB (median / max) | seconds | "
             "answer MB | rows/s |", "|---|---|---|---|---|---|---|"]
    for fmt, r in results.items():
        lines.append(f"| {fmt} | {r['idle_mb']:.1f} | {r['peak_mb']:.1f} | "
                     f"{r['delta_mb']:.1f} / {r['max_delta_mb']:.1f} | {r['seconds']:.2f} | "
                     f"{r['mb']:.0f} | {args.rows / r['seconds']:,.0f} |")
    write_result("stream-memory", lines)


if __name__ == "__main__":
    main()
