"""Batch SQL jobs kept in the metadata database (carto-compat.md §10): a queue that
outlives restarts and crashes, shared by every server process.

A job row holds its query (the job JSON's `query`, per-query statuses included), its status,
the key that made it (whose role runs it) and that key's token sealed for this job only
(AES-GCM, erased when the job ends). `claim` hands the next job to one runner with `FOR
UPDATE SKIP LOCKED`: a user's oldest pending job, only while none of theirs runs (one
user's jobs run in order), the user whose last job started longest ago first (fair across
users). A runner marks its job's `heartbeat_at`; a running job whose heartbeat stopped (its
server died) becomes `unknown` (`orphans`).
"""

from __future__ import annotations

import uuid
from typing import Any

from psycopg.types.json import Jsonb

from grantkey.db.cluster import AdminConnection

CHANNEL = "grantkey_jobs"  # NOTIFY'd with a job id when one is created or cancelled

JOBS_DDL = """
CREATE TABLE IF NOT EXISTS public.batch_jobs (
    id            uuid PRIMARY KEY,
    user_id       text NOT NULL REFERENCES public.users(id) ON DELETE CASCADE,
    key_id        text NOT NULL,
    query         jsonb NOT NULL,
    status        text NOT NULL,
    failed_reason text,
    fallback_status text,
    sealed_token  bytea,
    time_limit    double precision NOT NULL,
    lease         double precision,
    created_at    timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    updated_at    timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    started_at    timestamptz,
    ended_at      timestamptz,
    heartbeat_at  timestamptz,
    backend_pid   integer,
    backend_start timestamptz
);
CREATE INDEX IF NOT EXISTS batch_jobs_queue ON public.batch_jobs (user_id, created_at, id)
    WHERE status IN ('pending', 'running');
CREATE INDEX IF NOT EXISTS batch_jobs_user ON public.batch_jobs (user_id, created_at DESC);
CREATE INDEX IF NOT EXISTS batch_jobs_started ON public.batch_jobs (user_id, started_at)
"""
_COLUMNS = ("id, user_id, key_id, query, status, failed_reason, fallback_status, time_limit, "
            "created_at, updated_at, started_at, ended_at")
FINAL = ("done", "failed", "cancelled", "unknown")

_CLAIM = f"""
UPDATE public.batch_jobs SET status = 'running', started_at = pg_catalog.clock_timestamp(),
       updated_at = pg_catalog.clock_timestamp(), heartbeat_at = pg_catalog.clock_timestamp(),
       lease = %(lease)s
WHERE id OPERATOR(pg_catalog.=) (
    SELECT j.id FROM public.batch_jobs j
    WHERE j.status OPERATOR(pg_catalog.=) 'pending'
      AND NOT EXISTS (SELECT FROM public.batch_jobs r
                      WHERE r.user_id OPERATOR(pg_catalog.=) j.user_id
                        AND r.status OPERATOR(pg_catalog.=) 'running')
      AND NOT EXISTS (SELECT FROM public.batch_jobs e
                      WHERE e.user_id OPERATOR(pg_catalog.=) j.user_id
                        AND e.status OPERATOR(pg_catalog.=) 'pending'
                        AND (e.created_at, e.id) OPERATOR(pg_catalog.<) (j.created_at, j.id))
    ORDER BY (SELECT pg_catalog.max(s.started_at) FROM public.batch_jobs s
              WHERE s.user_id OPERATOR(pg_catalog.=) j.user_id) NULLS FIRST, j.created_at
    LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING {_COLUMNS}, sealed_token
"""


async def create(meta: AdminConnection, *, user_id: str, key_id: str, query: Any,
                 sealed_token: bytes, job_id: uuid.UUID, time_limit: float) -> dict[str, Any]:
    """A pending job; `time_limit`: the seconds it may run (the creating server's setting,
    whichever server runs it)."""
    cur = await meta.execute(
        "INSERT INTO public.batch_jobs (id, user_id, key_id, query, status, sealed_token, "
        f"time_limit) VALUES (%s, %s, %s, %s, 'pending', %s, %s) RETURNING {_COLUMNS}",
        [job_id, user_id, key_id, Jsonb(query), sealed_token, time_limit])
    row = await cur.fetchone()
    assert row is not None
    return dict(row)


QUEUE_LOCK_CLASS = 0x676A  # "gj": advisory lock class of a user's job queue


async def lock_queue(meta: AdminConnection, user_id: str) -> None:
    """Until the transaction ends: one creation at a time for this user (its count of
    pending jobs stays true)."""
    await meta.execute("SELECT pg_catalog.pg_advisory_xact_lock(%s, pg_catalog.hashtext(%s))",
                       [QUEUE_LOCK_CLASS, user_id])


async def pending_count(meta: AdminConnection, user_id: str) -> int:
    cur = await meta.execute(
        "SELECT pg_catalog.count(*) AS n FROM public.batch_jobs "
        "WHERE user_id OPERATOR(pg_catalog.=) %s AND status OPERATOR(pg_catalog.=) 'pending'",
        [user_id])
    row = await cur.fetchone()
    return int(row["n"]) if row else 0


def _visible(key_id: str | None) -> str:
    return "" if key_id is None else " AND key_id OPERATOR(pg_catalog.=) %(key)s"


async def get(meta: AdminConnection, user_id: str, job_id: uuid.UUID,
              key_id: str | None) -> dict[str, Any] | None:
    """The job if this user's and (unless `key_id` is None: the master) that key's."""
    cur = await meta.execute(
        f"SELECT {_COLUMNS} FROM public.batch_jobs WHERE id OPERATOR(pg_catalog.=) %(id)s "
        f"AND user_id OPERATOR(pg_catalog.=) %(user)s{_visible(key_id)}",
        {"id": job_id, "user": user_id, "key": key_id})
    row = await cur.fetchone()
    return None if row is None else dict(row)


async def page(meta: AdminConnection, user_id: str, key_id: str | None, *, limit: int,
               offset: int) -> tuple[int, list[dict[str, Any]]]:
    """Newest first."""
    where = f"user_id OPERATOR(pg_catalog.=) %(user)s{_visible(key_id)}"
    params = {"user": user_id, "key": key_id, "limit": limit, "offset": offset}
    cur = await meta.execute(f"SELECT pg_catalog.count(*) AS n FROM public.batch_jobs "
                             f"WHERE {where}", params)
    total = await cur.fetchone()
    cur = await meta.execute(
        f"SELECT {_COLUMNS} FROM public.batch_jobs WHERE {where} "
        "ORDER BY created_at DESC, id DESC LIMIT %(limit)s OFFSET %(offset)s", params)
    return (int(total["n"]) if total else 0), [dict(row) for row in await cur.fetchall()]


async def lock(meta: AdminConnection, user_id: str, job_id: uuid.UUID,
               key_id: str | None) -> dict[str, Any] | None:
    """The job, locked for a change in this transaction (visible to the caller only)."""
    cur = await meta.execute(
        f"SELECT {_COLUMNS}, backend_pid, backend_start FROM public.batch_jobs "
        f"WHERE id OPERATOR(pg_catalog.=) %(id)s AND user_id OPERATOR(pg_catalog.=) %(user)s"
        f"{_visible(key_id)} FOR UPDATE",
        {"id": job_id, "user": user_id, "key": key_id})
    row = await cur.fetchone()
    return None if row is None else dict(row)


async def update(meta: AdminConnection, job_id: uuid.UUID, *, running_only: bool = False,
                 **fields: Any) -> dict[str, Any]:
    """Set columns (query as JSON); `updated_at` moves; a final status erases the sealed
    token and stamps `ended_at`. `running_only`: only while the job runs (a runner's
    change never overwrites a cancel); {} when nothing was changed."""
    sets = ["updated_at = pg_catalog.clock_timestamp()"]
    params: dict[str, Any] = {"id": job_id}
    for name, value in fields.items():
        if name not in ("query", "status", "failed_reason", "fallback_status", "backend_pid",
                        "backend_start"):
            raise ValueError(name)
        sets.append(f"{name} = %({name})s")
        params[name] = Jsonb(value) if name == "query" else value
    if fields.get("status") in FINAL:
        sets += ["sealed_token = NULL", "ended_at = pg_catalog.clock_timestamp()",
                 "backend_pid = NULL"]
    only = " AND status OPERATOR(pg_catalog.=) 'running'" if running_only else ""
    cur = await meta.execute(
        f"UPDATE public.batch_jobs SET {', '.join(sets)} WHERE id OPERATOR(pg_catalog.=) %(id)s"
        f"{only} RETURNING {_COLUMNS}", params)
    row = await cur.fetchone()
    return {} if row is None else dict(row)


async def claim(meta: AdminConnection, lease_seconds: float) -> dict[str, Any] | None:
    """The next job to run, now `running` under this runner's lease (None when there is
    none to run)."""
    cur = await meta.execute(_CLAIM, {"lease": lease_seconds})
    row = await cur.fetchone()
    return None if row is None else dict(row)


async def heartbeat(meta: AdminConnection, job_ids: list[uuid.UUID]) -> None:
    await meta.execute(
        "UPDATE public.batch_jobs SET heartbeat_at = pg_catalog.clock_timestamp() "
        "WHERE id OPERATOR(pg_catalog.=) ANY (%s) AND status OPERATOR(pg_catalog.=) 'running'",
        [job_ids])


async def status_of(meta: AdminConnection, job_id: uuid.UUID) -> str | None:
    cur = await meta.execute(
        "SELECT status FROM public.batch_jobs WHERE id OPERATOR(pg_catalog.=) %s", [job_id])
    row = await cur.fetchone()
    return None if row is None else str(row["status"])


async def orphans(meta: AdminConnection, reason: str) -> list[dict[str, Any]]:
    """Running jobs whose runner stopped beating for the lease it claimed them with: now
    `unknown` (with their last backend, to end it if it still runs)."""
    cur = await meta.execute(
        "WITH gone AS (SELECT id, user_id, backend_pid, backend_start FROM public.batch_jobs "
        "  WHERE status OPERATOR(pg_catalog.=) 'running' AND heartbeat_at OPERATOR(pg_catalog.<) "
        "  (pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) "
        "   pg_catalog.make_interval(secs => lease)) FOR UPDATE SKIP LOCKED) "
        "UPDATE public.batch_jobs j SET status = 'unknown', failed_reason = %(reason)s, "
        "  sealed_token = NULL, updated_at = pg_catalog.clock_timestamp(), "
        "  ended_at = pg_catalog.clock_timestamp(), backend_pid = NULL "
        "FROM gone WHERE j.id OPERATOR(pg_catalog.=) gone.id "
        "RETURNING gone.id, gone.user_id, gone.backend_pid, gone.backend_start",
        {"reason": reason})
    return [dict(row) for row in await cur.fetchall()]


async def purge(meta: AdminConnection, keep_days: int) -> int:
    """Delete the jobs that ended more than `keep_days` ago."""
    cur = await meta.execute(
        "DELETE FROM public.batch_jobs WHERE ended_at OPERATOR(pg_catalog.<) "
        "(pg_catalog.now() OPERATOR(pg_catalog.-) pg_catalog.make_interval(days => %s::int4))",
        [keep_days])
    return cur.rowcount
