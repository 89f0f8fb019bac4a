"""SIGKILL a server while its batch job runs, and while a COPY upload streams into it: after
a restart no job runs twice (the one cut short becomes `unknown`), every acknowledged job
runs, and nothing of a half-sent upload is visible."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import psycopg

from tests.conftest import Account, Login
from tests.support import ServerProcess

ORPHANED = "the server running this job stopped while it ran: it may or may not have completed"


def start(data_dir: Path, login: Login, name: str, **env: str) -> ServerProcess:
    process = ServerProcess(login.args(data_dir), data_dir / f"{name}.log",
                            {**login.env, "GRANTKEY_JOB_LEASE": "2", **env})
    process.wait_healthy()
    return process


def job(server: ServerProcess, account: Account, job_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/user/{account.username}/api/v2/sql/job/{job_id}",
                       params=account.master(), timeout=10)
    result: dict[str, Any] = answer.json()
    return result


def wait_for(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def logged(admin_url: str, account: Account) -> list[int]:
    with psycopg.connect(admin_url, dbname=account.user.database) as conn:
        return [n for (n,) in conn.execute("SELECT n FROM log ORDER BY n")]


def test_a_server_killed_while_its_job_runs_leaves_it_unknown_and_runs_the_rest_once(
        account: Account, data_dir: Path, login: Login, admin_url: str,
        owner_sql: Callable[[Account, str], None]) -> None:
    owner_sql(account, "CREATE TABLE log (n int)")
    victim = start(data_dir, login, "jobs-victim", GRANTKEY_JOB_RUNNERS="1")
    url = f"{victim.url}/user/{account.username}/api/v2/sql/job"
    cut = httpx.post(url, params=account.master(), json={"query": [
        "INSERT INTO log VALUES (1)", "SELECT pg_sleep(4)", "INSERT INTO log VALUES (2)"]}).json()
    queued = httpx.post(url, params=account.master(),
                        json={"query": "INSERT INTO log VALUES (3)"}).json()
    wait_for(lambda: job(victim, account, cut["job_id"])["query"][1]["status"] == "running")
    victim.stop(signal.SIGKILL)
    survivor = start(data_dir, login, "jobs-survivor", GRANTKEY_JOB_RUNNERS="1")
    try:
        wait_for(lambda: job(survivor, account, cut["job_id"])["status"] == "unknown")
        wait_for(lambda: job(survivor, account, queued["job_id"])["status"] == "done")
        after = job(survivor, account, cut["job_id"])
        assert (after["status"], after["failed_reason"]) == ("unknown", ORPHANED)
        time.sleep(5)  # past the cut job's pg_sleep: its last query must never run
        assert logged(admin_url, account) == [1, 3]
        assert job(survivor, account, cut["job_id"])["status"] == "unknown"
        with psycopg.connect(admin_url, dbname="grantkey") as conn:
            kept = conn.execute("SELECT count(*) FROM public.batch_jobs WHERE sealed_token "
                                "IS NOT NULL AND user_id = %s", [account.user.id]).fetchone()
        assert kept == (0,)
    finally:
        survivor.stop()


def test_a_server_killed_while_an_upload_streams_leaves_nothing_of_it(
        account: Account, data_dir: Path, login: Login, admin_url: str,
        owner_sql: Callable[[Account, str], None]) -> None:
    owner_sql(account, "CREATE TABLE log (n int); INSERT INTO log VALUES (0)")
    victim = start(data_dir, login, "copy-victim")
    address = urlsplit(victim.url)
    query = urlencode({"api_key": account.master_token, "q": "COPY log FROM STDIN"})
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(f"POST /user/{account.username}/api/v2/sql/copyfrom?{query} HTTP/1.1\r\n"
                     "Host: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        data = b"".join(b"%d\n" % n for n in range(1, 20_000))
        sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

        def copying() -> bool:
            with psycopg.connect(admin_url, dbname="grantkey") as conn:
                row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                                   "'COPY log FROM STDIN%%' AND state = 'active'").fetchone()
            return row is not None and row[0] > 0

        wait_for(copying)
        time.sleep(0.5)
        victim.stop(signal.SIGKILL)
    wait_for(lambda: not copying())
    assert logged(admin_url, account) == [0]
