"""Shared by the benchmarks: a throwaway grantkey server on the embedded PostgreSQL."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from grantkey.services.rate_store import table_path


def machine() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as info:
        memory_kb = int(info.readline().split()[1])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": f"{memory_kb / 2**20:.1f} GiB",
            "python": platform.python_version(), "date": datetime.now(UTC).isoformat(" ", "seconds"),
            "commit": commit or "unknown"}


def write_result(name: str, lines: list[str]) -> Path:
    """Print a benchmark's report and keep it as bench/results/<name>-<date>.md, or
    <name>-<date>-run<N>.md when a run of the same day is already kept (never over it)."""
    text = "\n".join(lines) + "\n"
    print(text)
    stem = Path(__file__).parent / "results" / f"{name}-{time.strftime('%Y-%m-%d')}"
    out, run = stem.with_name(stem.name + ".md"), 1
    while out.exists():
        run += 1
        out = stem.with_name(f"{stem.name}-run{run}.md")
    out.write_text(text)
    print(f"written to {out}")
    return out


class BenchServer:
    """`grantkey serve` on a fresh data directory; stopped (with PostgreSQL) on exit."""

    def __init__(self, workers: int = 1, env: dict[str, str] | None = None) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="gkbench-"))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (self.data_dir / "serve.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "grantkey.cli", "serve", "--data-dir", str(self.data_dir),
             "--port", str(self.port), "--workers", str(workers)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def cli(self, *args: str) -> dict[str, object]:
        out = subprocess.run([sys.executable, "-m", "grantkey.cli", *args, "--data-dir",
                              str(self.data_dir), "--json"], capture_output=True, text=True,
                             check=True).stdout
        result: dict[str, object] = json.loads(out)
        return result

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        self.log.close()
        table_path(self.data_dir).unlink(missing_ok=True)  # its rate-limit buckets
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> BenchServer:
        return self

    def __exit__(self, *args: object) -> None:
        self.stop()
