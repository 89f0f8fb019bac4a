"""`grantkey data`: load a CSV or GeoJSON file into a user's table, export a query or a
table to a CSV file, through the COPY endpoints' own path (services.copy): as the user's
master key, or as a given key's role with --key. A load is all or nothing (with --create,
the new table too)."""

from __future__ import annotations

import csv
import itertools
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import click
import orjson

from grantkey.cli.common import cluster_options, fail, load_settings, run_with_services
from grantkey.domain import loading
from grantkey.domain.keys import Principal
from grantkey.errors import BadInput, Unauthorized
from grantkey.services.container import Services
from grantkey.services.copy import Copied, Tally

READ_BYTES = 1 << 20


@click.group()
def data() -> None:
    """Load files into tables and export queries to files (COPY)."""


async def _principal(services: Services, username: str, token: str | None) -> Principal:
    user = await services.users.get(username)
    if token is None:  # the master, logged in with its token like any key (never as an admin)
        master = await services.keys.master_principal(user)
        token = (await services.keys.show(master, master.key.name)).token
        if token is None:
            raise BadInput("the master's token is not kept (GRANTKEY_STORE_TOKENS=false): "
                           "give --key with the token of a key that may do this")
    try:
        principal = await services.resolver.resolve(user, token, fresh=True)
    except Unauthorized:
        raise BadInput("--key is not a key of this user") from None
    if not principal.allows_api("sql"):
        raise BadInput("--key has no sql grant: it cannot use COPY")
    return principal


class Progress:
    """Bytes done, on stderr, at most ten times a second (with the total when known)."""

    def __init__(self, label: str, total: int | None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.shown = 0.0
        self.started = time.monotonic()
        self.seconds = 0.0

    def add(self, size: int) -> None:
        self.done += size
        now = time.monotonic()
        if now - self.shown >= 0.1:
            self.shown = now
            self._show(end="")

    def _show(self, end: str) -> None:
        mib = self.done / 2**20
        text = f"\r{self.label}: {mib:,.1f} MiB"
        if self.total:
            text += f" of {self.total / 2**20:,.1f} MiB ({100 * self.done / self.total:.0f}%)"
        click.echo(text + end, err=True, nl=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        """The last figures, and the line ended (before a summary or an error)."""
        self.seconds = time.monotonic() - self.started
        self._show(end="\n")


async def _file_blocks(handle: IO[bytes], progress: Progress) -> AsyncIterator[bytes]:
    while block := handle.read(READ_BYTES):
        progress.add(len(block))
        yield block


async def _iter_blocks(lines: Iterator[bytes], progress: Progress) -> AsyncIterator[bytes]:
    batch: list[bytes] = []
    size = 0
    for line in lines:
        batch.append(line)
        size += len(line)
        if size >= READ_BYTES:
            progress.add(size)
            yield b"".join(batch)
            batch, size = [], 0
    progress.add(size)
    yield b"".join(batch)


def _csv_plan(path: Path, delimiter: str, create: bool) -> tuple[list[str], list[tuple[str, str]]]:
    with path.open("r", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise BadInput(f"{path} is empty: a CSV file needs a header line")
        names = loading.checked_columns([name.strip() for name in header], "the CSV header")
        types = loading.csv_types(names, itertools.islice(reader, loading.SAMPLE_ROWS)) \
            if create else []
    return names, types


@data.command("load")
@click.argument("username")
@click.argument("table")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["csv", "geojson"]), default=None,
              help="The file's format (default: from its extension, else csv).")
@click.option("--create", is_flag=True,
              help="Create TABLE first, its columns from the CSV header or the GeoJSON "
                   "properties (types guessed from the values; geometry as the_geom).")
@click.option("--schema", default="public", show_default=True, help="TABLE's schema.")
@click.option("--delimiter", default=",", show_default=True, help="The CSV delimiter.")
@click.option("--key", "token", default=None,
              help="Load as this key of the user (its role's rights), not as the master.")
@cluster_options
def load(username: str, table: str, file: Path, fmt: str | None, create: bool, schema: str,
         delimiter: str, token: str | None, data_dir: Path | None,
         database_url: str | None) -> None:
    """Load FILE (CSV with a header line, or GeoJSON) into USERNAME's TABLE.

    The columns are the CSV header's (or the GeoJSON properties'), matched by name; the
    rows go through COPY, all or none: a bad row leaves the table as it was (and with
    --create, no table). Progress on stderr, a summary at the end.
    """
    if len(delimiter) != 1:
        fail("--delimiter must be one character", 2)
    fmt = fmt or ("geojson" if file.suffix.lower() in (".geojson", ".json") else "csv")
    settings = load_settings(data_dir, database_url)
    total = file.stat().st_size

    async def work(services: Services) -> tuple[int, float]:
        principal = await _principal(services, username, token)
        with Progress(f"loading {file.name}", total) as progress:
            copied = await _load(services, principal, progress)
        return copied.rows, progress.seconds

    async def _load(services: Services, principal: Principal, progress: Progress) -> Copied:
        if fmt == "csv":
            names, types = _csv_plan(file, delimiter, create)
            with file.open("rb") as handle:
                return await services.copy.load(
                    principal, schema, table, names, _file_blocks(handle, progress),
                    header=True, delimiter=delimiter, create=types if create else None)
        else:
            features = loading.features_of(_json(file))
            columns = loading.feature_columns(features)
            names = [name for name, _ in columns]
            rows = _iter_blocks(loading.feature_rows(features, names), progress)
            return await services.copy.load(principal, schema, table, names, rows,
                                            header=False, create=columns if create else None)

    rows, seconds = run_with_services(settings, work)
    click.echo(f"loaded {rows:,} rows into {schema}.{table} from {file} in {seconds:.1f} s "
               f"({total / 2**20 / max(seconds, 1e-6):,.1f} MiB/s)")


def _json(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as error:
        raise BadInput(f"{path} is not valid JSON: {error}") from None


@contextmanager
def _output(target: str) -> Iterator[IO[bytes]]:
    if target == "-":
        yield sys.stdout.buffer
        return
    path = Path(target)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as handle:
        try:
            yield handle
        except BaseException:
            handle.close()
            partial.unlink(missing_ok=True)
            raise
    partial.replace(path)


@data.command("export")
@click.argument("username")
@click.argument("file")
@click.option("--query", default=None, help="The SELECT whose rows to export.")
@click.option("--table", default=None, help="A table to export whole.")
@click.option("--schema", default="public", show_default=True, help="The table's schema.")
@click.option("--key", "token", default=None,
              help="Export as this key of the user (its role's rights), not as the master.")
@cluster_options
def export(username: str, file: str, query: str | None, table: str | None, schema: str,
           token: str | None, data_dir: Path | None, database_url: str | None) -> None:
    """Export a query's rows (--query) or a table (--table) of USERNAME to FILE as CSV with
    a header line ("-": standard output).

    The file appears only once the export is complete (written as FILE.partial first).
    """
    if (query is None) == (table is None):
        fail("give exactly one of --query and --table", 2)
    settings = load_settings(data_dir, database_url)

    async def work(services: Services) -> tuple[int, int, float]:
        principal = await _principal(services, username, token)
        tally = Tally()
        running = await services.copy.export(
            principal, query=query, table=None if table is None else (schema, table),
            tally=tally)
        async with running:
            with _output(file) as out, Progress("exporting", None) as progress:
                async for block in running.blocks():
                    out.write(block)
                    progress.add(len(block))
        return tally.rows, progress.done, progress.seconds

    rows, size, seconds = run_with_services(settings, work)
    where = "standard output" if file == "-" else file
    click.echo(f"exported {rows:,} rows ({size / 2**20:,.1f} MiB) to {where} in {seconds:.1f} s",
               err=file == "-")

