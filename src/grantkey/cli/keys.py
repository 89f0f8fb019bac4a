"""`grantkey keys`: list, create, delete and regenerate a user's API keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from grantkey.cli.common import (
    cluster_options,
    every_page,
    fail,
    load_settings,
    print_table,
    run_with_services,
)
from grantkey.domain.keys import KEY_TYPES
from grantkey.http.documents import key_document
from grantkey.services.container import Services
from grantkey.services.keys import KeyView, ListQuery

ALL_TYPES = list(KEY_TYPES)


def _grants_from_options(
    grants: str | None, apis: tuple[str, ...], tables: tuple[str, ...], schemas: tuple[str, ...]
) -> Any:
    if grants is not None:
        if apis or tables or schemas:
            fail("--grants is the whole grants array: give the APIs, tables and schemas "
                 "inside it, not with --api, --table or --schema-create too", 2)
        try:
            return json.loads(grants)
        except json.JSONDecodeError as error:
            fail(f"--grants is not valid JSON: {error}", 2)
    entries = []
    for spec in tables:
        target, _, permissions = spec.rpartition(":")
        schema, dot, table = target.partition(".")
        if not target or not dot or not permissions:
            fail(f"--table {spec!r}: use SCHEMA.TABLE:perm[,perm]", 2)
        entries.append({"schema": schema, "name": table, "permissions": permissions.split(",")})
    database: dict[str, Any] = {"type": "database", "tables": entries,
                                "schemas": [{"name": s, "permissions": ["create"]} for s in schemas]}
    return [{"type": "apis", "apis": list(apis)}, database]


def _print_keys(views: list[KeyView], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([key_document(view) for view in views]))
        return
    rows = []
    for view in views:
        doc = key_document(view)
        tables = ", ".join(f"{t['schema']}.{t['name']}:{','.join(t['permissions'])}"
                           for t in doc["grants"][1]["tables"])
        rows.append([view.record.name, doc["type"], ",".join(view.record.apis), tables,
                     doc["updated_at"]])
    print_table(["name", "type", "apis", "tables", "updated_at"], rows)


@click.group()
def keys() -> None:
    """Manage a user's API keys, acting as that user's master key."""


@keys.command("list")
@click.argument("username")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of key objects.")
@cluster_options
def list_(username: str, as_json: bool, data_dir: Path | None, database_url: str | None) -> None:
    """List USERNAME's keys (master, default public, then regular keys)."""

    async def work(services: Services) -> list[KeyView]:
        user = await services.users.get(username)
        master = await services.keys.master_principal(user)
        async def fetch(page: int) -> tuple[list[KeyView], int]:
            found = await services.keys.list(master, ListQuery(types=ALL_TYPES, page=page,
                                                               per_page=1000))
            return found.keys, found.total

        return await every_page(fetch)

    _print_keys(run_with_services(load_settings(data_dir, database_url), work), as_json)


@keys.command("create")
@click.argument("username")
@click.argument("name")
@click.option("--grants", help="The whole grants array as JSON (the Auth API's format).")
@click.option("--api", "apis", multiple=True, type=click.Choice(["sql", "maps"]),
              help="An API the key may use (repeatable).")
@click.option("--table", "tables", multiple=True, metavar="SCHEMA.TABLE:PERMS",
              help="e.g. public.cities:select,insert (repeatable).")
@click.option("--schema-create", "schemas", multiple=True, metavar="SCHEMA",
              help="Let the key create tables in SCHEMA (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the key object as JSON.")
@cluster_options
def create(username: str, name: str, grants: str | None, apis: tuple[str, ...],
           tables: tuple[str, ...], schemas: tuple[str, ...], as_json: bool,
           data_dir: Path | None, database_url: str | None) -> None:
    """Create a regular key NAME for USERNAME; prints its token."""
    document = _grants_from_options(grants, apis, tables, schemas)

    async def work(services: Services) -> KeyView:
        user = await services.users.get(username)
        return await services.keys.create(await services.keys.master_principal(user), name,
                                          document)

    view = run_with_services(load_settings(data_dir, database_url), work)
    if as_json:
        click.echo(json.dumps(key_document(view)))
    else:
        click.echo(f"created key {name}\ntoken: {view.token}")


@keys.command("delete")
@click.argument("username")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Confirm: the key stops working at once.")
@cluster_options
def delete(username: str, name: str, yes: bool, data_dir: Path | None, database_url: str | None) -> None:
    """Delete USERNAME's regular key NAME (tables it created stay, owned by the user)."""
    if not yes:
        fail(f"deleting key '{name}' revokes it at once; add --yes to confirm", 2)

    async def work(services: Services) -> None:
        user = await services.users.get(username)
        await services.keys.delete(await services.keys.master_principal(user), name)

    run_with_services(load_settings(data_dir, database_url), work)
    click.echo(f"deleted key {name}")


@keys.command("regenerate")
@click.argument("username")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the key object as JSON.")
@cluster_options
def regenerate(username: str, name: str, as_json: bool, data_dir: Path | None,
               database_url: str | None) -> None:
    """Give USERNAME's key NAME a new token; the old one stops working at once."""

    async def work(services: Services) -> KeyView:
        user = await services.users.get(username)
        return await services.keys.regenerate(await services.keys.master_principal(user), name)

    view = run_with_services(load_settings(data_dir, database_url), work)
    if as_json:
        click.echo(json.dumps(key_document(view)))
    else:
        click.echo(f"regenerated key {name}\ntoken: {view.token}")
