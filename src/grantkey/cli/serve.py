"""`grantkey serve`: start the embedded PostgreSQL (unless given a URL) and the HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import resource
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import IO

import click
import uvicorn

from grantkey.cli.common import embedded_cluster, fail, load_settings, setting_options
from grantkey.cli.embedded import ROUTINE_ROLE, EmbeddedPostgres
from grantkey.errors import GrantkeyError, SetupError
from grantkey.services.container import Services
from grantkey.services.reconcile import reconcile
from grantkey.services.upgrade import (
    apply_cluster_limits,
    apply_storage_quotas,
    prepare_routine_admin,
    superuser_available,
    upgrade_user_databases,
)
from grantkey.settings import Settings, sql_connections_per_worker

log = logging.getLogger("grantkey.serve")
MAX_RESTART_BACKOFF = 30.0


async def _prepare(settings: Settings, *, own_cluster: bool) -> Settings:
    """Migrate the metadata, create the secret, and repair what a crash left behind.
    Returns the settings with the key-role connection cap sized from the cluster."""
    assert settings.database_url is not None
    if own_cluster:
        assert settings.superuser_url is not None
        await prepare_routine_admin(settings.superuser_url, ROUTINE_ROLE)
        await apply_cluster_limits(settings.superuser_url, settings.temp_file_limit)
    services = Services(settings, settings.database_url)
    await services.open(migrate=True)
    try:
        if settings.storage_quota != "-1" and not await superuser_available(services.cluster):
            raise SetupError(
                "GRANTKEY_STORAGE_QUOTA needs a PostgreSQL superuser to install the triggers "
                "that enforce it: set GRANTKEY_SUPERUSER_URL, or unset the quota")
        upgraded = await upgrade_user_databases(services.cluster)
        if upgraded:
            click.echo(f"upgraded {len(upgraded)} user database(s)", err=True)
        quotas = await apply_storage_quotas(services.cluster, settings.storage_quota)
        if quotas:
            click.echo(f"storage quota set to {settings.storage_quota} on {len(quotas)} user "
                       "database(s)", err=True)
        reset = await services.repair.reset_all_settings()
        if reset:
            click.echo(f"reset the role settings of {len(reset)} key role(s)", err=True)
        repair = await reconcile(services.cluster, services.revoker)
        if repair.anything:
            click.echo(f"start-up repair: {repair}", err=True)
        cluster_max = await services.cluster.max_connections()
    finally:
        await services.close()
    open_files = raise_open_files_limit()
    if settings.sql_max_connections is None:
        settings = replace(settings, sql_max_connections=sql_connections_per_worker(
            cluster_max, settings.workers, open_files))
    click.echo(f"PostgreSQL max_connections {cluster_max}: up to "
               f"{settings.sql_max_connections} key-role connections per worker "
               f"({settings.workers} worker(s))", err=True)
    return settings


_held_locks: list[IO[str]] = []


def raise_open_files_limit() -> int:
    """Lift this process's soft open-file limit to its hard one (workers inherit it): a
    worker holds a socket per pooled key session. The limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = 1_048_576 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _lock_data_dir(data_dir: Path) -> None:
    """One `grantkey serve` per embedded data directory: a second one would stop the first
    one's PostgreSQL when it exits. The lock goes with this process (even on kill -9)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = (data_dir / "serve.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        fail(f"another `grantkey serve` (pid {holder}) is using the data directory {data_dir}: "
             "stop it first, or give this one another --data-dir", 1)
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held_locks.append(handle)


class Supervisor(threading.Thread):
    """Restarts the embedded PostgreSQL when it dies (kill -9, OOM), with a bounded
    back-off, for as long as the server runs. Checks twice a second."""

    def __init__(self, embedded: EmbeddedPostgres, interval: float = 0.5) -> None:
        super().__init__(name="postgres-supervisor", daemon=True)
        self.embedded = embedded
        self.interval = interval
        self._stopping = threading.Event()

    def run(self) -> None:
        backoff = 1.0
        while not self._stopping.wait(self.interval):
            if self.embedded.postmaster_alive():
                backoff = 1.0
                continue
            click.echo("the embedded PostgreSQL stopped unexpectedly: restarting it", err=True)
            try:
                if not self.embedded.is_initialised():  # never a new, empty cluster
                    raise SetupError(f"{self.embedded.pgdata} holds no cluster any more")
                self.embedded.start()
            except Exception as error:  # the supervisor must not die: retry later
                first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
                click.echo(f"PostgreSQL did not restart ({first_line}); next try in "
                           f"{backoff:g} s", err=True)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_RESTART_BACKOFF)
                continue
            click.echo("the embedded PostgreSQL is running again", err=True)

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=70)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


def _stop_cleanly_on_signals() -> None:
    """uvicorn shuts down gracefully, then re-raises SIGINT/SIGTERM to the handler it found:
    with this one, the embedded PostgreSQL is stopped and the exit code is 0."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_stop)


@click.command()
@setting_options("host", "port", "workers", "data_dir", "database_url")
def serve(host: str | None, port: int | None, workers: int | None, data_dir: Path | None,
          database_url: str | None) -> None:
    """Serve the Auth API, SQL API and datasets API (and a health check) over HTTP.

    Without --database-url, initialises (first run) and starts a private PostgreSQL under
    --data-dir, and stops it when the server exits (Ctrl-C or SIGTERM).
    """
    settings = load_settings(data_dir, database_url, host=host, port=port, workers=workers)
    settings = replace(settings, data_dir=settings.data_dir.resolve())
    try:
        embedded = None if settings.database_url else embedded_cluster(settings)
    except SetupError as error:
        fail(str(error), 2)
    if embedded is not None:
        _lock_data_dir(settings.data_dir)
    supervisor: Supervisor | None = None
    try:
        if embedded is not None:
            click.echo(f"starting the embedded PostgreSQL in {embedded.pgdata} ...", err=True)
            embedded.start()
            if embedded.binaries is not None:
                click.echo(embedded.binaries.describe(), err=True)
            settings = replace(settings, database_url=embedded.admin_url,
                               superuser_url=embedded.superuser_url)
        settings = asyncio.run(_prepare(settings, own_cluster=embedded is not None))
        if embedded is not None:
            supervisor = Supervisor(embedded)
            supervisor.start()
        os.environ.update(settings.as_env())
        click.echo(f"grantkey listening on http://{settings.host}:{settings.port}", err=True)
        _stop_cleanly_on_signals()
        uvicorn.run(
            "grantkey.http.app:create_app", factory=True, host=settings.host,
            port=settings.port, workers=settings.workers, access_log=False,
            log_level=settings.log_level,
            server_header=False, http="grantkey.http.protocol:BoundedHttpProtocol",
            # a client's address is the peer's, unless the peer is a proxy the operator
            # trusts (uvicorn would believe any local client's X-Forwarded-For)
            proxy_headers=bool(settings.trusted_proxies),
            forwarded_allow_ips=settings.trusted_proxies or None,
            # a client that holds a connection open cannot hold up the shutdown for long
            timeout_graceful_shutdown=int(max(settings.sql_timeout,
                                              settings.sql_master_timeout)) + 5,
        )
    except _Stop:
        click.echo("grantkey stopped", err=True)
    except GrantkeyError as error:
        fail(str(error), 1)
    finally:
        if supervisor is not None:
            supervisor.stop()  # before PostgreSQL: never restarted while stopping
        if embedded is not None:
            embedded.stop()
