"""Batch SQL jobs (carto-compat.md §10): /api/v2/sql/job, run by the servers' runners as the
key that made them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import Account, KeyHandle
from tests.support import table_grants

FINAL = ("done", "failed", "cancelled", "unknown")
pytestmark = pytest.mark.usefixtures("job_runners")


def jobs_url(account: Account, job_id: str | None = None) -> str:
    base = f"{account.sql_url}/job"
    return base if job_id is None else f"{base}/{job_id}"


def create(http: httpx.Client, account: Account, token: str, query: object) -> httpx.Response:
    return http.post(jobs_url(account), json={"query": query, "api_key": token})


def read(http: httpx.Client, account: Account, token: str, job_id: str) -> dict[str, Any]:
    answer = http.get(jobs_url(account, job_id), params={"api_key": token})
    assert answer.status_code == 200, answer.text
    job: dict[str, Any] = answer.json()
    return job


def wait(http: httpx.Client, account: Account, token: str, job_id: str,
         until: tuple[str, ...] = FINAL, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = read(http, account, token, job_id)
        if job["status"] in until or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


@pytest.fixture
def writer(account: Account, owner_sql: Callable[[Account, str], None],
           make_key: Callable[..., KeyHandle]) -> KeyHandle:
    owner_sql(account, "CREATE TABLE log (n int, note text)")
    return make_key(account, "writer", table_grants([("public", "log", ["select", "insert"])]))


def rows(http: httpx.Client, account: Account, q: str = "SELECT n, note FROM log ORDER BY n"
         ) -> list[dict[str, Any]]:
    answer = account.sql(http, q, account.master_token)
    result: list[dict[str, Any]] = answer.json()["rows"]
    return result


def test_a_job_is_created_201_and_runs_as_its_key(account: Account, writer: KeyHandle,
                                                 http: httpx.Client) -> None:
    answer = create(http, account, writer.token, "INSERT INTO log VALUES (1, current_user)")
    assert answer.status_code == 201, answer.text
    job = answer.json()
    assert set(job) == {"job_id", "user", "query", "status", "created_at", "updated_at"}
    assert (job["user"], job["status"]) == (account.username, "pending")
    assert job["created_at"].endswith("Z") and len(job["created_at"]) == 24
    done = wait(http, account, writer.token, job["job_id"])
    assert done["status"] == "done", done
    assert rows(http, account) == [{"n": 1, "note": writer.role}]


def test_a_multiple_job_runs_in_order_and_stops_at_the_first_failure(
        account: Account, writer: KeyHandle, http: httpx.Client) -> None:
    job = create(http, account, writer.token, [
        "INSERT INTO log VALUES (1, 'a')", "INSERT INTO nope VALUES (2)",
        "INSERT INTO log VALUES (3, 'c')"]).json()
    assert job["query"] == [{"query": "INSERT INTO log VALUES (1, 'a')", "status": "pending"},
                            {"query": "INSERT INTO nope VALUES (2)", "status": "pending"},
                            {"query": "INSERT INTO log VALUES (3, 'c')", "status": "pending"}]
    done = wait(http, account, writer.token, job["job_id"])
    assert done["status"] == "failed"
    assert done["failed_reason"] == 'relation "nope" does not exist'
    assert [q["status"] for q in done["query"]] == ["done", "failed", "skipped"]
    assert rows(http, account) == [{"n": 1, "note": "a"}]


def test_a_fallback_job_runs_onsuccess_and_onerror_with_their_templates(
        account: Account, writer: KeyHandle, http: httpx.Client) -> None:
    job = create(http, account, writer.token, {
        "query": [
            {"query": "INSERT INTO log VALUES (1, 'first')",
             "onsuccess": "INSERT INTO log VALUES (2, '<%= job_id %>')"},
            {"query": "SELECT 1/0",
             "onerror": "INSERT INTO log VALUES (3, '<%= error_message %>')"},
            {"query": "INSERT INTO log VALUES (9, 'never')", "onsuccess": "SELECT 1"}],
        "onerror": "INSERT INTO log VALUES (4, 'job failed')"}).json()
    assert job["fallback_status"] == "pending"
    done = wait(http, account, writer.token, job["job_id"])
    assert done["status"] == "failed", done
    assert done["fallback_status"] == "done"
    assert [(q["status"], q.get("fallback_status")) for q in done["query"]["query"]] == [
        ("done", "done"), ("failed", "done"), ("skipped", "skipped")]
    assert done["query"]["query"][1]["failed_reason"] == "division by zero"
    assert done["query"]["onerror"] == "INSERT INTO log VALUES (4, 'job failed')"
    assert rows(http, account) == [{"n": 1, "note": "first"}, {"n": 2, "note": job["job_id"]},
                                   {"n": 3, "note": "division by zero"},
                                   {"n": 4, "note": "job failed"}]


def test_an_error_message_with_quotes_cannot_end_the_templates_literal(
        account: Account, writer: KeyHandle, http: httpx.Client) -> None:
    """CARTO splices the message raw: a value in it could end the '…' and add SQL."""
    job = create(http, account, writer.token, {"query": [{
        "query": "SELECT 'x''); DELETE FROM log; --'::int",
        "onerror": "INSERT INTO log VALUES (1, '<%= error_message %>')"}]}).json()
    done = wait(http, account, writer.token, job["job_id"])
    assert done["query"]["query"][0]["fallback_status"] == "done", done
    assert rows(http, account) == [
        {"n": 1, "note": "invalid input syntax for type integer: \"x'); DELETE FROM log; --\""}]


@pytest.mark.parametrize("query", [
    None, "", "   ", [], [""], ["SELECT 1", 2], [None], {"query": "SELECT 1"}, {"query": []},
    {"query": ["SELECT 1"]}, {"query": [{"query": ""}]}, {"query": [{"onsuccess": "x"}]},
    {"query": [{"query": "SELECT 1", "timeout": "5"}]},
    {"query": [{"query": "SELECT 1", "timeout": 0}]}, 5, True, "SELECT \x00"],
    ids=lambda q: repr(q)[:40])
def test_an_invalid_query_is_400_you_must_indicate_a_valid_sql(
        account: Account, writer: KeyHandle, http: httpx.Client, query: object) -> None:
    answer = create(http, account, writer.token, query)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"][0].startswith("You must indicate a valid SQL")


def test_a_payload_over_16_kib_is_400_naming_its_size(account: Account, writer: KeyHandle,
                                                      http: httpx.Client) -> None:
    query = "SELECT '" + "x" * 16_400 + "'"
    answer = create(http, account, writer.token, query)
    size = len(f'{{"query":"{query}","api_key":"{writer.token}"}}')
    assert (answer.status_code, answer.json()) == (400, {"error": [
        f"Your payload is too large: {size} bytes. Max size allowed is 16384 bytes (16kb)."]})


def test_jobs_are_listed_newest_first_the_master_sees_all_a_key_its_own(
        account: Account, writer: KeyHandle, make_key: Callable[..., KeyHandle],
        http: httpx.Client) -> None:
    other = make_key(account, "other", table_grants([("public", "log", ["select"])]))
    first = create(http, account, writer.token, "SELECT 1").json()["job_id"]
    second = create(http, account, other.token, "SELECT 2").json()["job_id"]
    third = create(http, account, writer.token, "SELECT 3").json()["job_id"]
    listed = http.get(jobs_url(account), params={"api_key": account.master_token}).json()
    assert [job["job_id"] for job in listed["result"]] == [third, second, first]
    assert (listed["total"], listed["count"]) == (3, 3)
    own = http.get(jobs_url(account) + "/", params={"api_key": writer.token,
                                                    "per_page": 1, "page": 2}).json()
    assert [job["job_id"] for job in own["result"]] == [first]
    assert own["total"] == 2 and "prev" in own["_links"]
    assert http.get(jobs_url(account, second), params={"api_key": writer.token}).json() == {
        "error": [f"Job with id {second} not found"]}
    assert read(http, account, account.master_token, second)["query"] == "SELECT 2"


@pytest.mark.parametrize("job_id", ["not-a-uuid", "00000000-0000-4000-8000-000000000000"])
def test_an_unknown_job_is_404(account: Account, writer: KeyHandle, http: httpx.Client,
                               job_id: str) -> None:
    for method in ("GET", "DELETE", "PUT"):
        answer = http.request(method, jobs_url(account, job_id), params={"api_key": writer.token},
                              json={"query": "SELECT 1"} if method == "PUT" else None)
        assert (answer.status_code, answer.json()) == (
            404, {"error": [f"Job with id {job_id} not found"]}), method


def test_another_users_job_is_404(account: Account, writer: KeyHandle,
                                  make_account: Callable[[], Account],
                                  http: httpx.Client) -> None:
    job_id = create(http, account, writer.token, "SELECT 1").json()["job_id"]
    stranger = make_account()
    answer = http.get(jobs_url(stranger, job_id), params={"api_key": stranger.master_token})
    assert answer.status_code == 404
    answer = http.delete(jobs_url(stranger, job_id), params={"api_key": stranger.master_token})
    assert answer.status_code == 404


def test_the_default_public_key_and_keys_without_sql_cannot_use_jobs(
        account: Account, writer: KeyHandle, make_key: Callable[..., KeyHandle],
        http: httpx.Client) -> None:
    anonymous = http.post(jobs_url(account), json={"query": "SELECT 1"})
    assert anonymous.status_code == 403
    assert anonymous.json()["error"][0].startswith("Batch jobs need an API key")
    maps = make_key(account, "maps", [{"type": "apis", "apis": ["maps"]}])
    for answer in (create(http, account, maps.token, "SELECT 1"),
                   http.get(jobs_url(account), params={"api_key": maps.token})):
        assert (answer.status_code, answer.json()) == (403, {"error": ["forbidden"], "hint": (
            'key "maps" has no grant for the sql API (its APIs: maps); create a key with "sql" '
            "in its apis")})
    unknown = create(http, account, "gkr" + "0" * 38, "SELECT 1")
    assert (unknown.status_code, unknown.json()) == (401, {"error": ["Unauthorized"]})


def test_cancel_a_pending_and_a_running_job_and_not_a_finished_one(
        account: Account, writer: KeyHandle, http: httpx.Client) -> None:
    running = create(http, account, writer.token,
                     ["INSERT INTO log VALUES (1, 'a')", "SELECT pg_sleep(30)",
                      "INSERT INTO log VALUES (2, 'b')"]).json()["job_id"]
    pending = create(http, account, writer.token, "INSERT INTO log VALUES (3, 'c')").json()
    assert wait(http, account, writer.token, running, until=("running",))["status"] == "running"
    time.sleep(0.5)  # into its pg_sleep
    cancelled = http.delete(jobs_url(account, pending["job_id"]),
                            params={"api_key": writer.token})
    assert (cancelled.status_code, cancelled.json()["status"]) == (200, "cancelled")
    started = time.monotonic()
    cancelled = http.delete(jobs_url(account, running), params={"api_key": writer.token})
    assert cancelled.json()["status"] == "cancelled"
    assert [q["status"] for q in cancelled.json()["query"]] == ["done", "cancelled", "skipped"]
    # the runner stops at once, and the user's queue moves on
    after = create(http, account, writer.token, "INSERT INTO log VALUES (4, 'd')").json()
    assert wait(http, account, writer.token, after["job_id"])["status"] == "done"
    assert time.monotonic() - started < 10
    assert read(http, account, writer.token, running)["status"] == "cancelled"
    assert rows(http, account) == [{"n": 1, "note": "a"}, {"n": 4, "note": "d"}]
    again = http.delete(jobs_url(account, running), params={"api_key": writer.token})
    assert (again.status_code, again.json()) == (
        400, {"error": ["Cannot set status from cancelled to cancelled"]})
    finished = http.delete(jobs_url(account, after["job_id"]), params={"api_key": writer.token})
    assert (finished.status_code, finished.json()) == (
        400, {"error": ["Cannot set status from done to cancelled"]})
