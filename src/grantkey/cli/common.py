"""What every command shares: cluster options, reaching PostgreSQL, reporting errors."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import sys
import unicodedata
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from grantkey.cli.embedded import ROUTINE_ROLE, EmbeddedPostgres, sizing
from grantkey.cli.pg_binaries import choose_binaries
from grantkey.errors import (
    BadInput,
    GrantkeyError,
    KeyNotFound,
    NotFound,
    UserNotFound,
    ValidationFailed,
)
from grantkey.services.container import Services
from grantkey.services.upgrade import prepare_routine_admin
from grantkey.settings import SETTING, Setting, Settings

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class SettingValue(click.ParamType):  # type: ignore[type-arg]
    """A flag's value, read by its setting's own parser (the same as its variable's)."""

    def __init__(self, row: Setting) -> None:
        self.row = row
        self.name = row.parser.metavar.lower()

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.row.parser.read(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


def setting_options(*names: str) -> Callable[[F], F]:
    """The command-line flags of these settings, from the settings table: a flag given
    wins over its variable, which `Settings.from_env` reads (the flag's default is None)."""

    def decorate(command: F) -> F:
        for name in reversed(names):
            row = SETTING[name]
            assert row.flag is not None, f"the setting {name} has no command-line flag"
            shown = row.shown_default
            described = f"{row.help} [env: {row.env}]" + (f"  [default: {shown}]" if shown else "")
            command = click.option(row.flag, name, default=None, type=SettingValue(row),
                                   help=described)(command)
        return command

    return decorate


cluster_options = setting_options("data_dir", "database_url")


def load_settings(data_dir: Path | None, database_url: str | None, **flags: Any) -> Settings:
    """The settings from GRANTKEY_* and the flags given; a bad value exits 2 with one line
    naming the setting."""
    try:
        return Settings.from_env(data_dir=data_dir, database_url=database_url, **flags)
    except GrantkeyError as error:
        fail(str(error), 2)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def embedded_cluster(settings: Settings) -> EmbeddedPostgres:
    """The embedded cluster under the data directory, run by its binaries (pg_binaries)."""
    binaries = choose_binaries(settings.data_dir, settings.pg_bin_dir)
    return EmbeddedPostgres(settings.data_dir, bin_dir=binaries.bin, binaries=binaries,
                            size=sizing(settings.pg_max_connections, settings.pg_shared_buffers))


@contextlib.contextmanager
def reach_cluster(settings: Settings, *, keep_running: bool = False) -> Iterator[Settings]:
    """Settings with a database URL: the embedded cluster is started if needed.

    A cluster this command started is stopped afterwards unless `keep_running`; one that
    was already running (a server on the same data directory) is left alone.
    """
    if settings.database_url:
        yield settings
        return
    embedded = embedded_cluster(settings)
    if not embedded.is_initialised():  # a mistyped --data-dir must not make a new cluster
        fail(f"{settings.data_dir} holds no grantkey data directory: check --data-dir (or "
             "GRANTKEY_DATA_DIR), or run `grantkey serve` once to create it there", 2)
    # a cluster this command starts is stopped afterwards, unless a server owns the data
    # directory (it may be restarting PostgreSQL this very moment)
    started = not embedded.is_running() and not serve_holds(settings.data_dir)
    if not embedded.is_running():
        click.echo(f"starting the embedded PostgreSQL in {embedded.pgdata} ...", err=True)
    embedded.start()
    asyncio.run(prepare_routine_admin(embedded.superuser_url, ROUTINE_ROLE))
    try:
        yield replace(settings, database_url=embedded.admin_url,
                      superuser_url=embedded.superuser_url)
    finally:
        if started and not keep_running:
            embedded.stop()


def serve_holds(data_dir: Path) -> bool:
    """Is a `grantkey serve` running on this data directory (its lock is taken)?"""
    lock = data_dir / "serve.lock"
    if not lock.exists():
        return False
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def run_with_services(settings: Settings, work: Callable[[Services], Awaitable[T]]) -> T:
    """Run one async use case against the cluster, turning grantkey errors into exit codes."""

    async def main(resolved: Settings) -> T:
        assert resolved.database_url is not None
        services = Services(resolved, resolved.database_url)
        await services.open()
        try:
            return await work(services)
        finally:
            await services.close()

    try:
        with reach_cluster(settings) as resolved:
            return asyncio.run(main(resolved))
    except (BadInput, ValidationFailed) as error:
        fail(str(error), 2)
    except UserNotFound as error:
        fail(f"no user named {error.username!r}", 1)
    except KeyNotFound as error:
        fail(f"no API key named {error.name!r}", 1)
    except NotFound as error:  # its message names what is missing
        fail(str(error), 1)
    except GrantkeyError as error:
        fail(str(error) or type(error).__name__, 1)


async def every_page(fetch: Callable[[int], Awaitable[tuple[list[T], int]]]) -> list[T]:
    """All items of a paged listing: `fetch(page)` gives (that page's items, the total),
    pages from 1 until the total is reached or a page comes back empty."""
    items: list[T] = []
    page = 1
    while True:
        batch, total = await fetch(page)
        items += batch
        if len(items) >= total or not batch:
            return items
        page += 1


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A table on the terminal. Cells are plain text: never read as rich markup (a key named
    `[b]Default public` prints as typed), and control or format characters (escape
    sequences, U+202E) print as `\\u…` escapes."""
    table = Table(*headers)
    for row in rows:
        table.add_row(*(Text(visible(cell)) for cell in row))
    Console(markup=False, emoji=False, highlight=False).print(table)


def visible(value: str) -> str:
    return "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf") else c
                   for c in value)
