"""Batch SQL jobs (carto-compat.md §10): created by any key with the `sql` grant (not the
anonymous default public key), kept in the metadata database, run by every server process's
runners as the key that made them, one user's jobs in order and users in turn.

A job logs in as its key's role with the key's token, sealed for that job (AES-256-GCM, the
user and the job as associated data) and erased when the job ends, whatever
GRANTKEY_STORE_TOKENS says: the role's password is derived from the token, never stored. A
key deleted or regenerated before its job runs leaves a token that no longer resolves (the
job fails, saying so); one revoked while its job runs has its sessions terminated (the job
fails, saying so). A job whose server died while it ran becomes `unknown` once its heartbeat
is older than the lease, and is never run again (part of it may have committed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from grantkey.db import jobs as job_store
from grantkey.db import sessions
from grantkey.db.cluster import Cluster
from grantkey.db.failures import CLEANUP_ERRORS
from grantkey.db.notify import listening, notify
from grantkey.db.role_pools import RoleConnection, left_busy
from grantkey.db.sql_exec import CANCEL_GRACE_SECONDS, Execution
from grantkey.db.users import find_user_by_id
from grantkey.domain import jobs as domain
from grantkey.domain.keys import KeyType, Principal
from grantkey.domain.secrets_box import SecretBox
from grantkey.errors import (
    BadInput,
    DatabaseUnavailable,
    Forbidden,
    JobNotFound,
    PoolExhausted,
    QueryInterrupted,
    SqlError,
    Unauthorized,
)
from grantkey.services.resolver import KeyResolver, usable
from grantkey.services.sql import SqlService

log = logging.getLogger("grantkey.jobs")
REVOKED = ("the key that created this job was deleted or its token regenerated: the job "
           "does not run")
REVOKED_WHILE_RUNNING = "the key that created this job was deleted or regenerated while it ran"
ORPHANED = ("the server running this job stopped while it ran: it may or may not have "
            "completed")
INTERRUPTED = ("the database session ended during the query; it may or may not have run")
POLL_SECONDS = 1.0
REASON_CHARS = 8192  # a huge error (a 5 MB value in it) is not kept whole for 30 days
WATCH_SECONDS = 1.0  # how often a running statement checks whether its job was cancelled
PURGE_EVERY = 3600.0


def _job_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise JobNotFound(raw) from None


def _scope(user_id: str, job_id: uuid.UUID) -> bytes:
    return f"batch job\x00{user_id}\x00{job_id}".encode()


def _visible_key(principal: Principal) -> str | None:
    """The master sees every job of its user; other keys their own."""
    return None if principal.is_master else principal.key.id


@dataclass(frozen=True)
class JobLimits:
    max_queued: int
    time_limit: float
    lease_seconds: float
    keep_days: int


class JobService:
    def __init__(self, cluster: Cluster, box: SecretBox, limits: JobLimits) -> None:
        self.cluster = cluster
        self.box = box
        self.limits = limits

    async def create(self, principal: Principal, raw_query: object) -> dict[str, Any]:
        if principal.key.type is KeyType.DEFAULT:
            raise Forbidden("Batch jobs need an API key: the default public key (no key) "
                            "cannot create them")
        query = domain.stored_query(raw_query)
        user = principal.user
        job_id = uuid.uuid4()
        sealed = self.box.encrypt_token(principal.token, _scope(user.id, job_id))
        async with self.cluster.metadata() as meta, meta.transaction():
            await job_store.lock_queue(meta, user.id)  # concurrent creates count in turn
            if await job_store.pending_count(meta, user.id) >= self.limits.max_queued:
                raise BadInput(f"Failed to create job. Max number of jobs "
                               f"({self.limits.max_queued}) queued reached")
            row = await job_store.create(meta, user_id=user.id, key_id=principal.key.id,
                                         query=query, sealed_token=sealed, job_id=job_id,
                                         time_limit=self.limits.time_limit)
            fallback = domain.job_fallback_status(query)
            if fallback is not None:
                row = await job_store.update(meta, job_id, fallback_status=fallback)
            await notify(meta, job_store.CHANNEL, str(job_id))
        return domain.document(row, user.username)

    async def get(self, principal: Principal, raw_id: str) -> dict[str, Any]:
        async with self.cluster.metadata() as meta:
            row = await job_store.get(meta, principal.user.id, _job_id(raw_id),
                                      _visible_key(principal))
        if row is None:
            raise JobNotFound(raw_id)
        return domain.document(row, principal.user.username)

    async def list(self, principal: Principal, page: int, per_page: int
                   ) -> tuple[int, list[dict[str, Any]]]:
        async with self.cluster.metadata() as meta:
            total, rows = await job_store.page(meta, principal.user.id, _visible_key(principal),
                                               limit=per_page, offset=(page - 1) * per_page)
        return total, [domain.document(row, principal.user.username) for row in rows]

    async def cancel(self, principal: Principal, raw_id: str) -> dict[str, Any]:
        """Pending: cancelled. Running: cancelled, and its statement cancelled in
        PostgreSQL (its runner sees the job cancelled and leaves it so). Else 400 `Cannot
        set status from <status> to cancelled` (the SDK matches that text)."""
        job_id = _job_id(raw_id)
        async with self.cluster.metadata() as meta, meta.transaction():
            row = await job_store.lock(meta, principal.user.id, job_id, _visible_key(principal))
            if row is None:
                raise JobNotFound(raw_id)
            if row["status"] in domain.FINAL:
                raise BadInput(f"Cannot set status from {row['status']} to cancelled")
            query = _cancelled_query(row["query"])
            fallback = {"pending": "skipped", "running": "cancelled"}.get(
                row.get("fallback_status") or "", row.get("fallback_status"))
            updated = await job_store.update(meta, job_id, status="cancelled", query=query,
                                             fallback_status=fallback)
        if row["status"] == "running" and row.get("backend_pid") and row.get("backend_start"):
            with contextlib.suppress(*CLEANUP_ERRORS):
                async with self.cluster.metadata() as meta:
                    await sessions.stop_session(meta, row["backend_pid"], row["backend_start"],
                                                terminate=False)
        return domain.document(updated, principal.user.username)

    async def replace_query(self, principal: Principal, raw_id: str,
                            raw_query: object) -> dict[str, Any]:
        """PUT: a pending job's query, replaced by one of the same form."""
        job_id = _job_id(raw_id)
        query = domain.stored_query(raw_query)
        async with self.cluster.metadata() as meta, meta.transaction():
            row = await job_store.lock(meta, principal.user.id, job_id, _visible_key(principal))
            if row is None:
                raise JobNotFound(raw_id)
            if domain.form(query) != domain.form(row["query"]):
                raise BadInput(domain.INVALID + ": a job's query keeps its form (a string, a "
                               "list of strings, or queries with fallbacks)")
            if row["status"] != "pending":
                raise BadInput("Job is not pending, it cannot be updated")
            updated = await job_store.update(meta, job_id, query=query,
                                             fallback_status=domain.job_fallback_status(query))
        return domain.document(updated, principal.user.username)

    async def purge_forever(self) -> None:
        """Delete the jobs that ended GRANTKEY_JOB_KEEP_DAYS ago, now and every hour."""
        while True:
            try:
                async with self.cluster.metadata() as meta:
                    gone = await job_store.purge(meta, self.limits.keep_days)
                if gone:
                    log.info("%d finished batch jobs deleted", gone)
            except CLEANUP_ERRORS as error:
                log.warning("purging batch jobs failed: %s", type(error).__name__)
            await asyncio.sleep(PURGE_EVERY)


def _cancelled_query(query: Any) -> Any:
    """The active item (its query or its fallback running) cancelled, or else the first
    pending one; the ones after it skipped."""
    items = domain.items_of(query)
    for index, item in enumerate(items):
        if item.get("status") == "running":
            return domain.skip_rest(domain.set_item(query, index, status="cancelled"), index)
        if item.get("fallback_status") == "running":
            return domain.skip_rest(domain.set_item(query, index, fallback_status="cancelled"),
                                    index)
    for index, item in enumerate(items):
        if item.get("status") == "pending":
            return domain.skip_rest(domain.set_item(query, index, status="cancelled"), index)
    return query


class JobRunner:
    """A process's job runners: `slots` loops claiming and running jobs, woken by NOTIFY
    (and every POLL_SECONDS), a heartbeat for the jobs they run, and the sweep that makes
    the jobs of dead runners `unknown`."""

    def __init__(self, cluster: Cluster, sql: SqlService, resolver: KeyResolver,
                 box: SecretBox, limits: JobLimits, slots: int) -> None:
        self.cluster = cluster
        self.sql = sql
        self.resolver = resolver
        self.box = box
        self.limits = limits
        self.slots = slots
        self.running: set[uuid.UUID] = set()
        self._wake = asyncio.Event()

    async def run_forever(self) -> None:
        tasks = [asyncio.create_task(self._listen(), name="jobs-listen"),
                 asyncio.create_task(self._heartbeat(), name="jobs-heartbeat"),
                 *(asyncio.create_task(self._slot(), name=f"jobs-{n}")
                   for n in range(self.slots))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _listen(self) -> None:
        while True:
            try:
                async with listening(self.cluster.conninfo("grantkey"),
                                     job_store.CHANNEL) as payloads:
                    self._wake.set()
                    async for _ in payloads:
                        self._wake.set()
            except DatabaseUnavailable as error:
                log.warning("job listener lost its connection: %s", error)
            await asyncio.sleep(POLL_SECONDS)

    async def _heartbeat(self) -> None:
        beat = self.limits.lease_seconds / 3
        while True:
            await asyncio.sleep(beat)
            try:
                async with self.cluster.metadata() as meta:
                    if self.running:
                        await job_store.heartbeat(meta, list(self.running))
                    for gone in await job_store.orphans(meta, ORPHANED):
                        log.warning("job %s: its runner stopped; now unknown", gone["id"])
                        if gone["backend_pid"] and gone["backend_start"]:
                            await sessions.stop_session(meta, gone["backend_pid"],
                                                        gone["backend_start"], terminate=True)
            except CLEANUP_ERRORS as error:
                log.warning("job heartbeat failed: %s", type(error).__name__)

    async def _slot(self) -> None:
        while True:
            try:
                job = await self._claim()
            except CLEANUP_ERRORS as error:
                log.warning("claiming a job failed: %s", type(error).__name__)
                job = None
            if job is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
                continue
            self._wake.set()  # another slot may find another user's job
            self.running.add(job["id"])
            try:
                await JobRun(self, job).run()
            except CLEANUP_ERRORS as error:  # the database went away: the sweep makes it
                log.warning("job %s stopped: %s", job["id"], type(error).__name__)  # unknown
            except Exception:  # a bug: the job fails, the slot goes on
                log.exception("job %s failed unexpectedly", job["id"])
                with contextlib.suppress(*CLEANUP_ERRORS):
                    async with self.cluster.metadata() as meta:
                        await job_store.update(meta, job["id"], running_only=True,
                                               status="failed", failed_reason="internal error")
            finally:
                self.running.discard(job["id"])

    async def _claim(self) -> dict[str, Any] | None:
        async with self.cluster.metadata() as meta:
            return await job_store.claim(meta, self.limits.lease_seconds)


class JobRun:
    """One job, from its claim to its final status."""

    def __init__(self, runner: JobRunner, job: dict[str, Any]) -> None:
        self.runner = runner
        self.job = job
        self.id: uuid.UUID = job["id"]
        self.query = job["query"]
        self.time_limit = float(job["time_limit"])
        self.deadline = time.monotonic() + self.time_limit
        self.principal: Principal | None = None

    async def run(self) -> None:
        principal = await self._principal()
        if principal is None:
            await self._finish("failed", REVOKED)
            return
        self.principal = principal
        try:
            await self._run_all()
        except Unauthorized:
            await self._finish("failed", REVOKED_WHILE_RUNNING)

    async def _principal(self) -> Principal | None:
        async with self.runner.cluster.metadata() as meta:
            user = await find_user_by_id(meta, self.job["user_id"])
        if user is None or self.job.get("sealed_token") is None:
            return None
        try:
            token = self.runner.box.decrypt_token(bytes(self.job["sealed_token"]),
                                                  _scope(user.id, self.id))
            principal = await self.runner.resolver.resolve(user, token, fresh=True)
        except Unauthorized:
            return None
        except ValueError:
            return None
        return principal if principal.key.id == self.job["key_id"] else None

    async def _run_all(self) -> None:
        kind = domain.form(self.query)
        failed: str | None = None
        for step in domain.main_steps(self.query):
            if step.item is not None and not await self._set(
                    query=domain.set_item(self.query, step.item, status="running")):
                return  # cancelled
            error = await self._step(step.sql, step.timeout_ms)
            if error == _CANCELLED:
                return
            if step.item is None:
                failed = error
                break
            if not await self._set(query=domain.set_item(
                    self.query, step.item, status="failed" if error else "done",
                    **({"failed_reason": error} if error else {}))):
                return
            if kind == "fallback" and not await self._item_fallback(step.item, error):
                return
            if error:
                failed = error
                await self._set(query=domain.skip_rest(self.query, step.item))
                break
        if kind == "fallback" and not await self._job_fallback(failed):
            return
        await self._finish("failed" if failed else "done", failed)

    async def _item_fallback(self, index: int, error: str | None) -> bool:
        """The item's onsuccess or onerror; False if the job was cancelled meanwhile."""
        item = domain.items_of(self.query)[index]
        name = "onerror" if error else "onsuccess"
        if "fallback_status" not in item:
            return True
        if name not in item:
            return await self._set(query=domain.set_item(self.query, index,
                                                         fallback_status="skipped"))
        if not await self._set(query=domain.set_item(self.query, index,
                                                     fallback_status="running")):
            return False
        text = domain.with_template(item[name], str(self.id), error)
        fallback_error = await self._step(text, None)
        if fallback_error == _CANCELLED:
            return False
        fields: dict[str, Any] = {"fallback_status": "failed" if fallback_error else "done"}
        if fallback_error:
            fields["failed_reason"] = fallback_error
        return await self._set(query=domain.set_item(self.query, index, **fields))

    async def _job_fallback(self, failed: str | None) -> bool:
        """The job's own onsuccess or onerror; False if the job was cancelled meanwhile."""
        if domain.job_fallback_status(self.query) is None:
            return True
        name = "onerror" if failed else "onsuccess"
        if name not in self.query:
            return await self._set(fallback_status="skipped")
        if not await self._set(fallback_status="running"):
            return False
        text = domain.with_template(self.query[name], str(self.id), failed)
        error = await self._step(text, None)
        if error == _CANCELLED:
            return False
        return await self._set(fallback_status="failed" if error else "done")

    async def _step(self, sql_text: str, timeout_ms: float | None) -> str | None:
        """Run one statement (several, separated by `;`, run as one) as the key: None if
        it succeeded, else PostgreSQL's message; _CANCELLED if the job was cancelled."""
        assert self.principal is not None
        limit = self.deadline - time.monotonic()
        if timeout_ms is not None:
            limit = min(limit, timeout_ms / 1000)
        limit = min(limit, self._until_key_stops())
        if limit <= 0:
            return self._past_limit()
        ends = time.monotonic() + limit
        try:
            await self._execute(sql_text, limit)
        except _Cancelled:
            return _CANCELLED
        except SqlError as error:
            if await self._cancelled():
                return _CANCELLED
            if error.status == 429:
                self._until_key_stops()  # cut because the key expired: the job fails so
                return self._timed_out(timeout_ms)
            return _shortened(error.message)
        except QueryInterrupted:  # also the time limit's terminate of a cancel-proof query
            if await self._cancelled():
                return _CANCELLED
            return self._timed_out(timeout_ms) if time.monotonic() >= ends else INTERRUPTED
        return _CANCELLED if await self._cancelled() else None

    def _until_key_stops(self) -> float:
        """Seconds until the job's token stops working (its key's expiry, an old token's
        grace); Unauthorized once it has (the job fails as revoked while running)."""
        assert self.principal is not None
        stops = self.principal.stop_time
        if stops is None:
            return math.inf
        usable(self.principal)
        return stops - time.time()

    def _timed_out(self, timeout_ms: float | None) -> str:
        if timeout_ms is None:
            return self._past_limit()
        return f"the query ran past its timeout ({timeout_ms:g} ms)"

    async def _execute(self, sql_text: str, limit: float) -> None:
        """On a session of the key's role (while none is free, wait and try again, within
        the job's time), watched: a cancel from any process stops it, a statement that
        ignores the cancel is terminated CANCEL_GRACE_SECONDS later."""
        assert self.principal is not None
        while True:
            try:
                async with self.runner.sql.session(self.principal) as conn:
                    if not await self._record_backend(conn):
                        raise _Cancelled()
                    execution = Execution(conn, sql_text, limit, self.runner.sql.terminate)
                    watch = asyncio.create_task(self._watch(conn))
                    try:
                        await execution.start()
                        async for _ in execution.rows():
                            pass
                    finally:
                        watch.cancel()
                        await execution.close()
                return
            except PoolExhausted:
                if time.monotonic() + 1 >= self.deadline:
                    raise SqlError(429, "no database connection became free") from None
                await asyncio.sleep(1)
                if await self._cancelled():
                    raise _Cancelled() from None
            finally:  # the session goes back: a cancel must not reach its next user
                with contextlib.suppress(*CLEANUP_ERRORS):
                    async with self.runner.cluster.metadata() as meta:
                        await job_store.update(meta, self.id, running_only=True,
                                               backend_pid=None, backend_start=None)

    async def _watch(self, conn: RoleConnection) -> None:
        """Every second: if the job is no longer running (cancelled), cancel the statement,
        and end the session if it has not stopped CANCEL_GRACE_SECONDS later."""
        while not await self._cancelled():
            await asyncio.sleep(WATCH_SECONDS)
        pid = conn.info.backend_pid
        with contextlib.suppress(*CLEANUP_ERRORS):
            await conn.cancel_safe(timeout=CANCEL_GRACE_SECONDS)
        await asyncio.sleep(CANCEL_GRACE_SECONDS)
        if not conn.closed and left_busy(conn):
            await self.runner.sql.terminate(pid)

    def _past_limit(self) -> str:
        return f"the job ran past its time limit ({self.time_limit:g} s)"

    async def _record_backend(self, conn: RoleConnection) -> bool:
        """The session's backend in the job's row (for a cancel from any process); False
        if the job is no longer running (cancelled before its statement started)."""
        pid = conn.info.backend_pid
        async with self.runner.cluster.metadata() as meta:
            started = await sessions.backend_start(meta, pid)
            return bool(await job_store.update(meta, self.id, running_only=True,
                                               backend_pid=pid, backend_start=started))

    async def _cancelled(self) -> bool:
        async with self.runner.cluster.metadata() as meta:
            return await job_store.status_of(meta, self.id) != "running"

    async def _set(self, **fields: Any) -> bool:
        """Record the job's progress (while it is still running); False once it is not."""
        if "query" in fields:
            self.query = fields["query"]
        async with self.runner.cluster.metadata() as meta:
            return bool(await job_store.update(meta, self.id, running_only=True, **fields))

    async def _finish(self, status: str, reason: str | None) -> None:
        async with self.runner.cluster.metadata() as meta:
            await job_store.update(meta, self.id, running_only=True, status=status,
                                   failed_reason=reason)


def _shortened(message: str) -> str:
    """A failed_reason is kept (and put in templates) at most REASON_CHARS long."""
    return message if len(message) <= REASON_CHARS else message[:REASON_CHARS - 1] + "…"


class _Cancelled(Exception):
    """The job was cancelled before its statement started."""


_CANCELLED = "\x00cancelled"  # a step's answer when the job was cancelled meanwhile (no
# PostgreSQL message holds a NUL)
