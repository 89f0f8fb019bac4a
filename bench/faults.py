"""Faults under load, and what clients saw: kill -9 of a worker, of PostgreSQL, and of
everything (then a restart).

A `grantkey serve --workers 2` on a fresh embedded cluster takes a steady mixed load (the
master inserting numbered rows, a regular key and anonymous clients reading); each fault
is injected in turn. Reported per fault: requests that failed and how, the longest any
request waited while the fault lasted, how long until every API served again (and, for
PostgreSQL, how long after it accepted connections again), and, after the kill of
everything and a restart, whether every acknowledged insert is there.

    .venv/bin/python bench/faults.py [--clients 6] [--steady 5] [--after 15]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).parent))
from common import BenchServer, machine, write_result

from grantkey.cli.embedded import EmbeddedPostgres


@dataclass
class Outcome:
    started: float
    ended: float
    kind: str
    status: int  # 0: the connection failed


@dataclass
class Load:
    """Client threads sending requests until stopped; every answer recorded."""

    server: BenchServer
    master: str
    reader: str
    clients: int
    outcomes: list[Outcome] = field(default_factory=list)
    acked: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _request(self, http: httpx.Client, kind: str) -> None:
        sql = f"{self.server.url}/user/bench/api/v2/sql"
        number = None
        if kind == "insert":
            with self._lock:
                self._next += 1
                number = self._next
            params = {"q": f"INSERT INTO acks VALUES ({number})", "api_key": self.master}
        elif kind == "read":
            params = {"q": "SELECT count(*) FROM cities", "api_key": self.reader}
        elif kind == "anonymous":
            params = {"q": "SELECT name FROM cities LIMIT 5"}
        else:
            sql = f"{self.server.url}/user/bench/api/v3/api_keys"
            params = {"api_key": self.master}
        started = time.monotonic()
        try:
            status = http.get(sql, params=params).status_code
        except httpx.HTTPError:
            status = 0
        self.outcomes.append(Outcome(started, time.monotonic(), kind, status))
        if kind == "insert" and status == 200 and number is not None:
            self.acked.add(number)

    def _client(self, index: int) -> None:
        kinds = ["insert", "read", "anonymous", "auth"]
        with httpx.Client(timeout=30) as http:
            turn = index
            while not self._stop.is_set():
                self._request(http, kinds[turn % len(kinds)])
                turn += 1

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                        for i in range(self.clients)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *args: object) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(60)


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


def workers(server: BenchServer) -> list[int]:
    """uvicorn's worker processes (spawned children of serve; not the resource tracker)."""
    return [p for p in children(server.process.pid)
            if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def postmaster(server: BenchServer) -> int:
    return int((server.data_dir / "pg" / "postmaster.pid").read_text().split("\n", 1)[0])


def accepting(server: BenchServer) -> bool:
    try:
        with psycopg.connect(EmbeddedPostgres(server.data_dir).admin_url, connect_timeout=1):
            return True
    except psycopg.Error:
        return False


def summary(load: Load, since: float, fault_at: float) -> dict[str, object]:
    window = [o for o in load.outcomes if o.started >= since]
    failed = [o for o in window if o.status != 200]
    during = [o for o in window if o.ended >= fault_at]
    statuses: dict[int, int] = {}
    for outcome in failed:
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
    back = {}
    for kind in ("insert", "read", "anonymous", "auth"):
        fails = [o.ended for o in window if o.kind == kind and o.status != 200]
        later_ok = [o.ended for o in window if o.kind == kind and o.status == 200
                    and (not fails or o.started > max(fails))]
        back[kind] = (min(later_ok) - fault_at) if later_ok else None
    return {"requests": len(window), "failed": statuses,
            "longest wait": max((o.ended - o.started for o in during), default=0.0),
            "back after": back}


def run_fault(load: Load, name: str, inject: Callable[[], None], steady: float,
              after: float) -> tuple[dict[str, object], float]:
    time.sleep(steady)
    since = time.monotonic() - 1
    fault_at = time.monotonic()
    inject()
    time.sleep(after)
    print(f"{name}: done", flush=True)
    return summary(load, since, fault_at), fault_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--steady", type=float, default=5)
    parser.add_argument("--after", type=float, default=15)
    args = parser.parse_args()
    env = {k: "" for k in os.environ if k.startswith("GRANTKEY_")}
    server = BenchServer(workers=2, env=env)
    lines = ["# Faults under load", "", *(f"- {k}: {v}" for k, v in machine().items()), "",
             f"`grantkey serve --workers 2`, {args.clients} client threads (inserts as the "
             "master, reads with a regular key and with no key, Auth API listings), "
             f"{args.steady:g} s steady before each fault, {args.after:g} s after.", ""]
    try:
        user = server.cli("users", "create", "bench")
        master = str(user["master_token"])
        with httpx.Client(timeout=30) as http:
            sql = f"{server.url}/user/bench/api/v2/sql"
            http.get(sql, params={"api_key": master, "q":
                     "CREATE TABLE acks (n int PRIMARY KEY); CREATE TABLE cities (name text);"
                     "INSERT INTO cities SELECT 'c' || g FROM generate_series(1, 50) g;"
                     "GRANT SELECT ON cities TO PUBLIC"}).raise_for_status()
            key = http.post(f"{server.url}/user/bench/api/v3/api_keys", params={
                "api_key": master}, json={"name": "reader", "grants": [
                    {"type": "apis", "apis": ["sql"]},
                    {"type": "database", "tables": [
                        {"schema": "public", "name": "cities", "permissions": ["select"]}]}]})
            reader = key.json()["token"]
        load = Load(server, master, reader, args.clients)
        with load:
            result, _ = run_fault(load, "worker", lambda: os.kill(workers(server)[0],
                                                                  signal.SIGKILL),
                                  args.steady, args.after)
            lines += ["## kill -9 of one worker", "", f"- {result}", ""]
            accepted: list[float] = []

            def kill_postgres() -> None:
                os.kill(postmaster(server), signal.SIGKILL)

                def watch() -> None:
                    time.sleep(0.2)
                    while not accepting(server):
                        time.sleep(0.05)
                    accepted.append(time.monotonic())
                threading.Thread(target=watch, daemon=True).start()

            result, fault_at = run_fault(load, "postgres", kill_postgres, args.steady,
                                         args.after)
            back = result["back after"]
            assert isinstance(back, dict)
            after_accepting = {k: None if v is None or not accepted else
                               round(v - (accepted[0] - fault_at), 2) for k, v in back.items()}
            lines += ["## kill -9 of PostgreSQL (the postmaster)", "", f"- {result}",
                      f"- PostgreSQL accepted again {accepted[0] - fault_at:.2f} s after the kill"
                      if accepted else "- PostgreSQL never accepted again",
                      f"- every API back, seconds after PostgreSQL accepted: {after_accepting}",
                      ""]
            time.sleep(args.steady)
        acked = set(load.acked)
        # everything: the server's whole process group and PostgreSQL, then a restart
        for pid in [*workers(server), server.process.pid, postmaster(server)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.process.wait(30)
        time.sleep(1)
        restarted = BenchServer.__new__(BenchServer)
        restarted.__dict__.update(server.__dict__)
        restarted.log = (server.data_dir / "serve2.log").open("wb")
        started = time.monotonic()
        restarted.process = subprocess.Popen(
            [sys.executable, "-m", "grantkey.cli", "serve", "--data-dir", str(server.data_dir),
             "--port", str(server.port), "--workers", "2"],
            stdout=restarted.log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        server = restarted
        while time.monotonic() - started < 120:
            try:
                if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        with httpx.Client(timeout=30) as http:
            rows = http.get(f"{server.url}/user/bench/api/v2/sql", params={
                "api_key": master, "q": "SELECT n FROM acks"}).json()["rows"]
        present = {row["n"] for row in rows}
        lines += ["## kill -9 of everything, then `grantkey serve` again", "",
                  f"- ready again {time.monotonic() - started:.1f} s after the restart",
                  f"- acknowledged inserts: {len(acked)}, missing after the restart: "
                  f"{len(acked - present)}", ""]
    finally:
        server.stop()
    write_result("faults", lines)


if __name__ == "__main__":
    main()
