"""Batch SQL jobs (carto-compat.md §10, docs/plans/batch-jobs-contract.md): the three
forms of a job's query, checked and put in their stored shape, the order its parts run in,
and the job JSON. No I/O here.

- simple: `"SELECT 1"`, stored as it is;
- multiple: `["q1", "q2"]`, stored as `[{"query": "q1", "status": "pending"}, …]`;
- fallback: `{"query": [{"query", "onsuccess"?, "onerror"?, "timeout"?}], "onsuccess"?,
  "onerror"?}`, each item given `status` (and `fallback_status` when it has a fallback), the
  job a `fallback_status` when it has one of its own.

Fields a client sends that the server owns (`status`, `failed_reason`, …) are dropped.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from grantkey.domain.sql_text import starts_a_copy
from grantkey.errors import BadInput

INVALID = "You must indicate a valid SQL"
FINAL = ("done", "failed", "cancelled", "unknown")
_JOB_ID = re.compile(r"<%=\s*job_id\s*%>")
_ERROR = re.compile(r"<%=\s*error_message\s*%>")


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise BadInput(INVALID)
    if starts_a_copy(value):
        raise BadInput("A batch job cannot COPY to or from the client (COPY ... TO STDOUT, "
                       "COPY ... FROM STDIN): use /api/v2/sql/copyfrom or copyto")
    return value


def _fallback_item(item: object) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise BadInput(INVALID)
    stored: dict[str, Any] = {"query": _text(item.get("query"))}
    for name in ("onsuccess", "onerror"):
        if item.get(name) is not None:
            stored[name] = _text(item[name])
    timeout = item.get("timeout")
    if timeout is not None:
        if (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                or not math.isfinite(timeout) or timeout <= 0):
            raise BadInput(INVALID + ": timeout must be a number of milliseconds above 0")
        stored["timeout"] = timeout
    stored["status"] = "pending"
    if "onsuccess" in stored or "onerror" in stored:
        stored["fallback_status"] = "pending"
    return stored


def stored_query(raw: object) -> Any:
    """The job's query in its stored shape; 400 `You must indicate a valid SQL` for any
    other shape (an empty string or list, an item that is not a non-empty string, …)."""
    if isinstance(raw, str):
        return _text(raw)
    if isinstance(raw, list):
        if not raw:
            raise BadInput(INVALID)
        return [{"query": _text(item), "status": "pending"} for item in raw]
    if isinstance(raw, dict):
        items = raw.get("query")
        if not isinstance(items, list) or not items:
            raise BadInput(INVALID)
        stored: dict[str, Any] = {"query": [_fallback_item(item) for item in items]}
        for name in ("onsuccess", "onerror"):
            if raw.get(name) is not None:
                stored[name] = _text(raw[name])
        return stored
    raise BadInput(INVALID)


def form(query: Any) -> str:
    if isinstance(query, str):
        return "simple"
    return "multiple" if isinstance(query, list) else "fallback"


def job_fallback_status(query: Any) -> str | None:
    """The job's own `fallback_status` at creation: pending when it has a job-level
    onsuccess or onerror."""
    if isinstance(query, dict) and ("onsuccess" in query or "onerror" in query):
        return "pending"
    return None


_DOLLAR_QUOTE = re.compile(r"\$((?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?)\$")


def literal_safe(message: str) -> str:
    r"""The message such that it cannot end a '…', E'…' or $tag$…$tag$ literal it is put in
    (CARTO splices it raw: a value in an error could end the literal and add SQL as the
    job's key): each `'` and `\` doubled, and a `$…$` that could close a dollar quote
    written with a full-width dollar sign (U+FF04) at its end."""
    text = message.replace("\\", "\\\\").replace("'", "''")
    return _DOLLAR_QUOTE.sub(lambda m: f"${m.group(1)}\uff04", text)


def with_template(text: str, job_id: str, error: str | None) -> str:
    """A fallback query with `<%= job_id %>` and (in onerror) `<%= error_message %>`
    replaced, the message made `literal_safe` (put it inside a literal, as templates do)."""
    text = _JOB_ID.sub(lambda _: job_id, text)
    if error is not None:
        safe = literal_safe(error)
        text = _ERROR.sub(lambda _: safe, text)
    return text


@dataclass(frozen=True)
class Step:
    """One statement a job runs: `item` (index in the query list, None for a simple job
    or the job's own fallback), `role` ("query", "onsuccess", "onerror")."""

    item: int | None
    role: str
    sql: str
    timeout_ms: float | None = None


def main_steps(query: Any) -> list[Step]:
    """The main queries, in order (fallbacks are decided as the job runs)."""
    if isinstance(query, str):
        return [Step(None, "query", query)]
    items = query if isinstance(query, list) else query["query"]
    return [Step(index, "query", item["query"], item.get("timeout"))
            for index, item in enumerate(items)]


def items_of(query: Any) -> list[dict[str, Any]]:
    if isinstance(query, str):
        return []
    return list(query if isinstance(query, list) else query["query"])


def skip_rest(query: Any, after: int, status: str = "skipped") -> Any:
    """Items after `after` (and their fallbacks) marked `status`."""
    query = copy.deepcopy(query)
    for item in items_of(query)[after + 1:]:
        item["status"] = status
        if "fallback_status" in item:
            item["fallback_status"] = "skipped"
    return query


def set_item(query: Any, index: int, **fields: Any) -> Any:
    """A copy of `query` with item `index`'s fields set."""
    query = copy.deepcopy(query)
    items = query if isinstance(query, list) else query["query"]
    items[index].update(fields)
    return query


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{value.microsecond // 1000:03d}Z"


def document(row: Mapping[str, Any], username: str) -> dict[str, Any]:
    """The job JSON CARTO's clients read."""
    job: dict[str, Any] = {"job_id": str(row["id"]), "user": username, "query": row["query"],
                           "status": row["status"], "created_at": _iso(row["created_at"]),
                           "updated_at": _iso(row["updated_at"])}
    if row.get("failed_reason") is not None:
        job["failed_reason"] = row["failed_reason"]
    if row.get("fallback_status") is not None:
        job["fallback_status"] = row["fallback_status"]
    return job
