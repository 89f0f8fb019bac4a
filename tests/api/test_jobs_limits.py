"""Batch jobs on servers of their own: one that runs none (the queue limit, PUT on a pending
job), one with a 3 s job time limit and GRANTKEY_STORE_TOKENS=false; and revocation."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.api.test_cli_data import cli
from tests.api.test_jobs_api import create, read, rows, wait
from tests.conftest import Account, KeyHandle, Login
from tests.support import ServerProcess, table_grants

pytestmark = pytest.mark.usefixtures("job_runners")


def serve(data_dir: Path, login: Login, name: str, **env: str) -> Iterator[ServerProcess]:
    server = ServerProcess(login.args(data_dir), data_dir / f"{name}.log",
                           {**login.env, **env})
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def idle(data_dir: Path, login: Login) -> Iterator[ServerProcess]:
    """Runs no job (the module's `job_runners` do); at most 2 pending per user."""
    yield from serve(data_dir, login, "jobs-idle", GRANTKEY_JOB_RUNNERS="0",
                     GRANTKEY_JOB_MAX_QUEUED="2")


@pytest.fixture(scope="module")
def strict(data_dir: Path, login: Login) -> Iterator[ServerProcess]:
    """Jobs made here may run 3 s; no token is kept for the Auth API; it runs jobs too."""
    yield from serve(data_dir, login, "jobs-strict", GRANTKEY_JOB_TIMEOUT="3",
                     GRANTKEY_STORE_TOKENS="false", GRANTKEY_JOB_RUNNERS="1")


def on(server: ServerProcess, account: Account) -> Account:
    return Account(account.user, account.master_token, server.url)


@pytest.fixture
def blocker(account: Account, http: httpx.Client) -> Iterator[str]:
    """A job of the master's that runs for a while: the user's later jobs stay pending
    behind it (one user's jobs run in order); cancelled afterwards."""
    job = create(http, account, account.master_token, "SELECT pg_sleep(60)").json()
    wait(http, account, account.master_token, job["job_id"], until=("running",))
    yield job["job_id"]
    http.delete(f"{account.sql_url}/job/{job['job_id']}", params=account.master())


@pytest.fixture
def writer(account: Account, owner_sql: Callable[[Account, str], None],
           make_key: Callable[..., KeyHandle]) -> KeyHandle:
    owner_sql(account, "CREATE TABLE log (n int, note text)")
    return make_key(account, "writer", table_grants([("public", "log", ["select", "insert"])]))


@pytest.mark.usefixtures("blocker")
def test_past_the_queue_limit_a_job_is_400(idle: ServerProcess, account: Account,
                                           writer: KeyHandle, http: httpx.Client) -> None:
    here = on(idle, account)
    for _ in range(2):
        assert create(http, here, writer.token, "SELECT 1").status_code == 201
    answer = create(http, here, account.master_token, "SELECT 1")
    assert (answer.status_code, answer.json()) == (
        400, {"error": ["Failed to create job. Max number of jobs (2) queued reached"]})


@pytest.mark.usefixtures("blocker")
def test_put_replaces_a_pending_jobs_query_of_the_same_form(
        idle: ServerProcess, account: Account, writer: KeyHandle, http: httpx.Client) -> None:
    here = on(idle, account)
    job = create(http, here, writer.token, ["SELECT 1", "SELECT 2"]).json()
    url = f"{here.sql_url}/job/{job['job_id']}"
    answer = http.put(url, json={"query": ["SELECT 3"], "api_key": writer.token})
    assert answer.status_code == 200, answer.text
    assert answer.json()["query"] == [{"query": "SELECT 3", "status": "pending"}]
    other_form = http.put(url, json={"query": "SELECT 3", "api_key": writer.token})
    assert other_form.status_code == 400
    assert other_form.json()["error"][0].startswith("You must indicate a valid SQL")
    http.delete(url, params={"api_key": writer.token})
    not_pending = http.put(url, json={"query": ["SELECT 4"], "api_key": writer.token})
    assert (not_pending.status_code, not_pending.json()) == (
        400, {"error": ["Job is not pending, it cannot be updated"]})


def test_a_job_past_its_time_limit_fails_saying_so(strict: ServerProcess, account: Account,
                                                   writer: KeyHandle, http: httpx.Client) -> None:
    here = on(strict, account)
    job = create(http, here, writer.token,
                 ["SELECT pg_sleep(2)", "SET statement_timeout = 0; SELECT pg_sleep(30)"]).json()
    started = time.monotonic()
    done = wait(http, here, writer.token, job["job_id"])
    assert done["status"] == "failed"
    assert done["failed_reason"] == "the job ran past its time limit (3 s)"
    assert [q["status"] for q in done["query"]] == ["done", "failed"]
    assert time.monotonic() - started < 10


def test_a_fallback_querys_timeout_in_milliseconds_lowers_the_limit(
        strict: ServerProcess, account: Account, writer: KeyHandle, http: httpx.Client) -> None:
    here = on(strict, account)
    job = create(http, here, writer.token, {"query": [
        {"query": "SELECT pg_sleep(10)", "timeout": 500,
         "onerror": "INSERT INTO log VALUES (1, '<%= error_message %>')"}]}).json()
    done = wait(http, here, writer.token, job["job_id"])
    assert done["status"] == "failed"
    assert rows(http, here) == [{"n": 1, "note": "the query ran past its timeout (500 ms)"}]


def test_with_store_tokens_false_a_job_runs_and_keeps_no_token_once_ended(
        strict: ServerProcess, account: Account, writer: KeyHandle, http: httpx.Client,
        admin_url: str) -> None:
    here = on(strict, account)
    job = create(http, here, writer.token, "INSERT INTO log VALUES (1, 'ran')").json()
    assert wait(http, here, writer.token, job["job_id"])["status"] == "done"
    with psycopg.connect(admin_url, dbname="grantkey") as conn:
        sealed, = conn.execute("SELECT sealed_token FROM public.batch_jobs WHERE id = %s",
                               [job["job_id"]]).fetchone() or (b"missing",)
        dump = conn.execute("SELECT t::text FROM public.batch_jobs t").fetchall()
    assert sealed is None
    assert not any(writer.token in row[0] for row in dump)
    assert rows(http, here) == [{"n": 1, "note": "ran"}]


def revoke(http: httpx.Client, account: Account, key: KeyHandle, how: str) -> None:
    url = f"{account.keys_url}/{key.name}"
    if how == "delete":
        assert http.delete(url, params=account.master()).status_code == 204
    else:
        assert http.post(f"{url}/token/regenerate", params=account.master()).status_code == 200


@pytest.mark.parametrize("how", ["delete", "regenerate"])
def test_a_revoked_keys_pending_job_never_runs(
        account: Account, writer: KeyHandle, blocker: str, http: httpx.Client, how: str) -> None:
    """Pending behind the master's job, revoked, then its turn comes."""
    job = create(http, account, writer.token, "INSERT INTO log VALUES (1, 'x')").json()
    revoke(http, account, writer, how)
    http.delete(f"{account.sql_url}/job/{blocker}", params=account.master())
    done = wait(http, account, account.master_token, job["job_id"])
    assert done["status"] == "failed"
    assert done["failed_reason"].startswith("the key that created this job was deleted or its "
                                            "token regenerated")
    assert rows(http, account) == []


@pytest.mark.parametrize("how", ["delete", "regenerate"])
def test_a_revoked_keys_running_job_stops_and_never_resumes(
        account: Account, writer: KeyHandle, http: httpx.Client, how: str) -> None:
    job = create(http, account, writer.token,
                 ["SELECT pg_sleep(30)", "INSERT INTO log VALUES (1, 'after')"]).json()
    wait(http, account, writer.token, job["job_id"], until=("running",))
    time.sleep(0.5)
    started = time.monotonic()
    revoke(http, account, writer, how)
    done = wait(http, account, account.master_token, job["job_id"])
    assert done["status"] == "failed", done
    assert done["failed_reason"] == ("the key that created this job was deleted or "
                                     "regenerated while it ran")
    assert time.monotonic() - started < 10
    time.sleep(1)
    assert rows(http, account) == []
    final: dict[str, Any] = read(http, account, account.master_token, job["job_id"])
    assert final["status"] == "failed"


def test_the_cli_lists_shows_and_cancels_a_users_jobs(
        login: Login, data_dir: Path, account: Account, writer: KeyHandle, blocker: str,
        http: httpx.Client) -> None:
    job = create(http, account, writer.token, "SELECT 1").json()["job_id"]  # behind blocker
    listed = cli(login, data_dir, "jobs", "list", account.username, "--json")
    assert listed.returncode == 0, listed.stderr
    assert [found["job_id"] for found in json.loads(listed.stdout)] == [job, blocker]
    table = cli(login, data_dir, "jobs", "list", account.username)
    assert job[:8] in table.stdout and "pending" in table.stdout  # (rich wraps long cells)
    shown = cli(login, data_dir, "jobs", "show", account.username, job)
    assert json.loads(shown.stdout)["status"] == "pending"
    cancelled = cli(login, data_dir, "jobs", "cancel", account.username, job)
    assert cancelled.stdout.strip() == f"job {job} is cancelled"
    again = cli(login, data_dir, "jobs", "cancel", account.username, job)
    assert (again.returncode, again.stderr.strip()) == (
        2, "error: Cannot set status from cancelled to cancelled")
    missing = cli(login, data_dir, "jobs", "show", account.username, "nope")
    assert (missing.returncode, missing.stderr.strip()) == (1, "error: Job with id nope not found")
