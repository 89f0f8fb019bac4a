"""`grantkey datasets`: set a table's privacy, list a user's datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from grantkey.cli.common import (
    cluster_options,
    every_page,
    load_settings,
    print_table,
    run_with_services,
)
from grantkey.domain.keys import PRIVACIES
from grantkey.services.container import Services


@click.group()
def datasets() -> None:
    """Table privacy (public, link, private) and dataset listings."""


@datasets.command("privacy")
@click.argument("username")
@click.argument("table")
@click.argument("privacy", type=click.Choice(PRIVACIES))
@click.option("--schema", default="public", show_default=True, help="The table's schema.")
@cluster_options
def privacy(username: str, table: str, privacy: str, schema: str, data_dir: Path | None,
            database_url: str | None) -> None:
    """Make USERNAME's TABLE public, link or private.

    public and link tables are readable by the default public key and, through
    inheritance, by every regular key; private ones only by keys granted them.
    """

    async def work(services: Services) -> dict[str, Any]:
        user = await services.users.get(username)
        return await services.datasets.change_privacy(user, schema, table, privacy)

    result = run_with_services(load_settings(data_dir, database_url), work)
    click.echo(f"{result['schema']}.{result['name']} is now {result['privacy']}")


@datasets.command("list")
@click.argument("username")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@cluster_options
def list_(username: str, as_json: bool, data_dir: Path | None, database_url: str | None) -> None:
    """List USERNAME's tables with their privacy."""

    async def work(services: Services) -> list[dict[str, Any]]:
        user = await services.users.get(username)
        master = await services.keys.master_principal(user)
        async def fetch(page: int) -> tuple[list[dict[str, Any]], int]:
            batch = await services.datasets.list(master, page, 1000)
            return batch.datasets, batch.total

        return await every_page(fetch)

    found = run_with_services(load_settings(data_dir, database_url), work)
    if as_json:
        click.echo(json.dumps(found))
        return
    print_table(["schema", "name", "privacy", "updated_at"],
                [[item["schema"], item["name"], item["privacy"], item["updated_at"] or ""]
                 for item in found])
