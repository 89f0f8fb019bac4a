"""Start-up time of `grantkey serve` until /health answers 200: fresh and existing data dir.

Run: python bench/startup.py [--runs 3]
Targets (issue 5, 7): fresh ≤ 10 s, existing ≤ 3 s.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import machine, write_result


def serve_until_healthy(data_dir: Path) -> float:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "grantkey.cli", "serve", "--data-dir",
                                str(data_dir), "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    fresh, existing = [], []
    for _ in range(args.runs):
        data_dir = Path(tempfile.mkdtemp(prefix="gkbench-")) / "data"
        fresh.append(serve_until_healthy(data_dir))
        existing.append(serve_until_healthy(data_dir))
        shutil.rmtree(data_dir.parent, ignore_errors=True)
    lines = ["# Start-up", "", *(f"- {k}: {v}" for k, v in machine().items()), "",
             f"- fresh data directory (initdb + start + migrate): {statistics.median(fresh):.2f} s "
             f"median of {args.runs} (target ≤ 10 s); all: {[round(t, 2) for t in fresh]}",
             f"- existing data directory: {statistics.median(existing):.2f} s median "
             f"(target ≤ 3 s); all: {[round(t, 2) for t in existing]}"]
    write_result("startup", lines)


if __name__ == "__main__":
    main()
