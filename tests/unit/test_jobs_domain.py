"""A batch job's query forms, their stored shape and its templates (no database)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from grantkey.domain import jobs
from grantkey.errors import BadInput


def test_each_form_is_stored_with_its_statuses_and_client_fields_dropped() -> None:
    assert jobs.stored_query("SELECT 1") == "SELECT 1"
    assert jobs.stored_query(["a", "b"]) == [{"query": "a", "status": "pending"},
                                             {"query": "b", "status": "pending"}]
    stored = jobs.stored_query({"query": [
        {"query": "a", "onerror": "e", "timeout": 500, "status": "done", "failed_reason": "x"},
        {"query": "b"}], "onsuccess": "s", "fallback_status": "done"})
    assert stored == {"query": [
        {"query": "a", "onerror": "e", "timeout": 500, "status": "pending",
         "fallback_status": "pending"},
        {"query": "b", "status": "pending"}], "onsuccess": "s"}
    assert jobs.job_fallback_status(stored) == "pending"
    assert jobs.job_fallback_status(["a"]) is None
    assert [jobs.form(q) for q in ("a", ["a"], stored)] == ["simple", "multiple", "fallback"]


@pytest.mark.parametrize("raw", [{"query": [{"query": "a", "onerror": 5}]},
                                 {"query": [{"query": "a"}], "onsuccess": ""},
                                 {"query": [{"query": "a", "timeout": float("inf")}]},
                                 {"query": [{"query": "a", "timeout": True}]}])
def test_fallbacks_and_timeouts_of_the_wrong_type_are_refused(raw: object) -> None:
    with pytest.raises(BadInput, match="You must indicate a valid SQL"):
        jobs.stored_query(raw)


def test_templates_take_the_job_id_and_the_error_made_literal_safe() -> None:
    text = "INSERT INTO t VALUES ('<%=job_id%>', '<%= error_message %>', '<%=  job_id  %>')"
    assert jobs.with_template(text, "j1", "it's $1 \\' $$ $x$ bad") == (
        "INSERT INTO t VALUES ('j1', 'it''s $1 \\\\'' $\uff04 $x\uff04 bad', 'j1')")
    assert jobs.with_template("SELECT '<%= error_message %>'", "j1", None) == (
        "SELECT '<%= error_message %>'")


def test_cancelling_and_skipping_mark_the_items_after_the_current_one() -> None:
    stored = jobs.stored_query({"query": [{"query": "a"}, {"query": "b", "onerror": "e"}]})
    skipped = jobs.skip_rest(jobs.set_item(stored, 0, status="failed"), 0)
    assert [(q["status"], q.get("fallback_status")) for q in skipped["query"]] == [
        ("failed", None), ("skipped", "skipped")]
    assert stored["query"][0]["status"] == "pending"  # copies, never changed in place


def test_the_job_document_has_carto_fields_and_iso_dates_with_milliseconds() -> None:
    at = datetime(2026, 12, 1, 10, 20, 30, 123456, tzinfo=UTC)
    row = {"id": "0e1", "query": "SELECT 1", "status": "failed", "created_at": at,
           "updated_at": at, "failed_reason": "boom", "fallback_status": None}
    assert jobs.document(row, "ana") == {
        "job_id": "0e1", "user": "ana", "query": "SELECT 1", "status": "failed",
        "created_at": "2026-12-01T10:20:30.123Z", "updated_at": "2026-12-01T10:20:30.123Z",
        "failed_reason": "boom"}
