"""`grantkey audit`: read a user's audit log (read-only, newest first)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from grantkey.cli.common import (
    cluster_options,
    every_page,
    load_settings,
    print_table,
    run_with_services,
)
from grantkey.domain.audit import AuditEntry
from grantkey.http.documents import audit_document
from grantkey.services.container import Services
from grantkey.services.events import EVENT_TYPES, AuditQuery


@click.command()
@click.argument("username")
@click.option("--name", "key_name", default=None, metavar="KEY",
              help="Only the events made by the key named KEY or about it.")
@click.option("--type", "types", multiple=True, type=click.Choice(EVENT_TYPES),
              help="Only events of this type (repeatable).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON array of entries (the HTTP API's documents).")
@cluster_options
def audit(username: str, key_name: str | None, types: tuple[str, ...], as_json: bool,
          data_dir: Path, database_url: str | None) -> None:
    """Print USERNAME's audit log, newest first: every key created, deleted or
    regenerated, the user's creation and deletion, every change of a dataset's privacy;
    who made it (key name and type, client address or `cli`) and when.

    The log is append-only: nothing here, nor anywhere in grantkey, changes it."""

    async def work(services: Services) -> list[AuditEntry]:
        user = await services.users.get(username)

        async def fetch(page: int) -> tuple[list[AuditEntry], int]:
            found = await services.events.read_for(user, AuditQuery(
                key_name=key_name, types=list(types) or None, page=page, per_page=1000))
            return found.entries, found.total

        return await every_page(fetch)

    entries = run_with_services(load_settings(data_dir, database_url), work)
    if as_json:
        click.echo(json.dumps([audit_document(entry) for entry in entries]))
        return
    rows = []
    for entry in entries:
        document = audit_document(entry)
        actor = document["actor"]
        who = "operator" if actor["key"] is None else f"{entry.actor_key} ({entry.actor_type})"
        rows.append([document["created_at"], entry.event, entry.key_name or "", who,
                     entry.client, json.dumps(entry.detail, ensure_ascii=False)])
    print_table(["at", "type", "key", "by", "client", "detail"], rows)
