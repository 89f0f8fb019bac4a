"""Interleaved A/B of two source trees: SQL API throughput of the same request, old vs new.

Run: python bench/ab.py --old /tmp/ab_old --new . [--rounds 5] [--duration 10]
Each tree (a checkout: its `src/` is put first on PYTHONPATH) gets its own `grantkey serve
--workers N` on a fresh embedded PostgreSQL, a user and one regular key (throughput.py's
`setup`). Then rounds of wrk (2 threads, 64 connections) against old and new alternately
(old-new, then new-old, …: a drift of the machine falls on both), each run the 10-row
query with the key in the query string. The report gives each side's median requests/s,
the ratio of the medians, and the median of each round's new/old ratio (also written to
bench/results/ab-<date>.md). Needs wrk. `--old X --new X` (the same tree twice) shows
the noise of the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from urllib.parse import quote

from common import BenchServer, machine, write_result
from throughput import QUERIES, setup, wrk


def serve(tree: Path, workers: int) -> tuple[BenchServer, str]:
    """A server running `tree`'s code, and the URL of the 10-row query with its key."""
    path = os.pathsep.join([str(tree / "src"), os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONPATH"] = path  # the CLI `setup` runs uses the same code
    server = BenchServer(workers=workers, env={"PYTHONPATH": path})
    try:
        ready = setup(server, 1)
    except BaseException:
        server.stop()
        raise
    token = next(iter(ready["tokens"]))  # type: ignore[call-overload]
    return server, f"{ready['sql']}?q={quote(QUERIES['10 rows'])}&api_key={token}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="checkout of the baseline")
    parser.add_argument("--new", type=Path, required=True, help="checkout of the change")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=10, help="seconds of each wrk run")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    saved = os.environ.get("PYTHONPATH", "")
    servers: dict[str, tuple[BenchServer, str]] = {}
    try:
        for side in ("old", "new"):
            os.environ["PYTHONPATH"] = saved
            servers[side] = serve(getattr(args, side).resolve(), args.workers)
        for url in (servers["old"][1], servers["new"][1]):
            wrk(url, 3)  # warm-up, not counted
        results: dict[str, list[float]] = {"old": [], "new": []}
        for number in range(args.rounds):
            order = ("old", "new") if number % 2 == 0 else ("new", "old")
            for side in order:
                result = wrk(servers[side][1], args.duration)
                if result["non2xx"] or result["socket_errors"]:
                    print(f"warning: {side} had errors: {result}", file=sys.stderr)
                results[side].append(result["rps"])
                print(f"round {number + 1} {side}: {result['rps']:.0f} req/s, "
                      f"p99 {result['p99_ms']:.2f} ms", flush=True)
    finally:
        for server, _ in servers.values():
            server.stop()
    old, new = (statistics.median(results[side]) for side in ("old", "new"))
    paired = statistics.median(n / o for n, o in zip(results["new"], results["old"], strict=True))
    write_result("ab", [
        f"# A/B: {args.old} (old) vs {args.new} (new)", "",
        f"machine: {machine()}", "",
        f"{args.rounds} rounds of {args.duration} s, wrk -t2 -c64, --workers {args.workers}, "
        "10-row query, one regular key in the query string", "",
        f"- old: median {old:.0f} req/s {[round(r) for r in results['old']]}",
        f"- new: median {new:.0f} req/s {[round(r) for r in results['new']]}",
        f"- new/old: {new / old:.3f} (medians), {paired:.3f} (median of paired rounds)"])


if __name__ == "__main__":
    main()
