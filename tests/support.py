"""Helpers shared by the tests: starting servers, free ports, logging in as key roles."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TEST_SECRET = "test-secret-" + "0123456789abcdef" * 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`grantkey serve` in a subprocess, its output kept in a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "grantkey.cli", "serve", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env},
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
