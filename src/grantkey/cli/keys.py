"""`grantkey keys`: list, create, delete and regenerate a user's API keys; find a token's key."""

from __future__ import annotations

import json
import sys
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
from grantkey.domain.key_options import parse_duration
from grantkey.domain.keys import KEY_TYPES, KeyType
from grantkey.domain.tokens import DEFAULT_PUBLIC_TOKEN, is_well_formed
from grantkey.http.documents import key_document, usage_document
from grantkey.services.container import Services
from grantkey.services.keys import KeyView, ListQuery, TokenOwner
from grantkey.services.usage import KeyUsage

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


def _duration(raw: str | None, option: str) -> float | None:
    if raw is None:
        return None
    seconds = parse_duration(raw)
    if seconds is None:
        fail(f"{option} {raw!r}: use a duration such as 30d, 12h, 90m or 3600s", 2)
    return seconds


@keys.command("list")
@click.argument("username")
@click.option("--unused-for", metavar="DURATION",
              help="Only keys not used (nor made) in that long, e.g. 30d.")
@click.option("--expiring-within", metavar="DURATION",
              help="Only keys that expire within that long from now, e.g. 7d.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of key objects.")
@cluster_options
def list_(username: str, unused_for: str | None, expiring_within: str | None, as_json: bool,
          data_dir: Path | None, database_url: str | None) -> None:
    """List USERNAME's keys (master, default public, then regular keys)."""
    unused = _duration(unused_for, "--unused-for")
    expiring = _duration(expiring_within, "--expiring-within")

    async def work(services: Services) -> list[KeyView]:
        user = await services.users.get(username)
        master = await services.keys.master_principal(user)
        async def fetch(page: int) -> tuple[list[KeyView], int]:
            found = await services.keys.list(master, ListQuery(
                types=ALL_TYPES, page=page, per_page=1000, unused_for=unused,
                expiring_within=expiring))
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
@click.option("--expires-at", metavar="ISO8601",
              help="When the key stops working, e.g. 2027-01-31T12:00:00Z.")
@click.option("--sql-timeout", "key_sql_timeout", type=float, metavar="SECONDS",
              help="A SQL time limit of the key's own, below the server's.")
@click.option("--json", "as_json", is_flag=True, help="Print the key object as JSON.")
@cluster_options
def create(username: str, name: str, grants: str | None, apis: tuple[str, ...],
           tables: tuple[str, ...], schemas: tuple[str, ...], expires_at: str | None,
           key_sql_timeout: float | None, as_json: bool, data_dir: Path | None,
           database_url: str | None) -> None:
    """Create a regular key NAME for USERNAME; prints its token."""
    document = _grants_from_options(grants, apis, tables, schemas)
    options: dict[str, Any] = {"expires_at": expires_at}
    if key_sql_timeout is not None:
        options["limits"] = {"sql_timeout_seconds": key_sql_timeout}

    async def work(services: Services) -> KeyView:
        user = await services.users.get(username)
        return await services.keys.create(await services.keys.master_principal(user), name,
                                          document, options=options)

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
@click.option("--grace", type=click.IntRange(min=0), default=0, metavar="SECONDS",
              help="Keep the old token working this long (default 0: it stops at once).")
@click.option("--json", "as_json", is_flag=True, help="Print the key object as JSON.")
@cluster_options
def regenerate(username: str, name: str, grace: int, as_json: bool, data_dir: Path | None,
               database_url: str | None) -> None:
    """Give USERNAME's key NAME a new token; the old one stops at once, or after --grace."""

    async def work(services: Services) -> KeyView:
        user = await services.users.get(username)
        return await services.keys.regenerate(await services.keys.master_principal(user), name,
                                              grace_seconds=grace)

    view = run_with_services(load_settings(data_dir, database_url), work)
    if as_json:
        click.echo(json.dumps(key_document(view)))
        return
    click.echo(f"regenerated key {name}\ntoken: {view.token}")
    if grace:
        click.echo(f"the old token works until {key_document(view)['old_token_stops_at']}")


@keys.command("usage")
@click.argument("username")
@click.argument("name")
@click.option("--days", type=click.IntRange(1, 366), default=30, show_default=True,
              help="How many days back, today included.")
@click.option("--json", "as_json", is_flag=True, help="Print the Auth API's usage document.")
@cluster_options
def usage(username: str, name: str, days: int, as_json: bool, data_dir: Path | None,
          database_url: str | None) -> None:
    """USERNAME's key NAME: requests per day and API, and when it was last used (written by
    the server once a minute: the last minute is not there yet)."""

    async def work(services: Services) -> KeyUsage:
        user = await services.users.get(username)
        return await services.usage.report(await services.keys.master_principal(user), name,
                                           days)

    document = usage_document(run_with_services(load_settings(data_dir, database_url), work))
    if as_json:
        click.echo(json.dumps(document))
        return
    click.echo(f"key {name}: last used {document['last_used_at'] or 'never'}")
    apis = sorted(document["total"])
    rows = [[day["date"], *(str(day["requests"].get(api, 0)) for api in apis)]
            for day in document["days"]]
    rows.append(["total", *(str(document["total"][api]) for api in apis)])
    print_table(["day", *apis], rows)


@keys.command("find")
@click.argument("token")
@click.option("--revoke", is_flag=True,
              help="Then revoke it: delete a regular key, regenerate a master key's token.")
@click.option("--yes", is_flag=True, help="Revoke without asking (with --revoke).")
@cluster_options
def find(token: str, revoke: bool, yes: bool, data_dir: Path | None,
         database_url: str | None) -> None:
    """Say whose key TOKEN is (a leaked token: found by its digest, every user searched),
    and offer to revoke it. Exit 1 if no key has it."""
    token = token.strip()
    if not is_well_formed(token) or token == DEFAULT_PUBLIC_TOKEN:
        fail("not a grantkey token: they look like gkm… or gkr… (41 characters, with a "
             "checksum; docs/security.md)", 2)

    async def look(services: Services) -> TokenOwner | None:
        return await services.keys.find_token(await services.users.all(), token)

    settings = load_settings(data_dir, database_url)
    owner = run_with_services(settings, look)
    if owner is None:
        fail("no key has this token (it was never one, or its key was deleted or regenerated)", 1)
    assert owner is not None
    record = owner.record
    which = "its current token" if owner.current else "its OLD token (regenerated with a grace)"
    click.echo(f"user {owner.user.username}, key {record.name!r} ({record.type.value}): {which}")
    click.echo(f"created {record.created_at:%Y-%m-%d %H:%M}Z; apis: {', '.join(record.apis) or '-'}")
    question = f"revoke key {record.name!r} of {owner.user.username} now?"
    if revoke:
        if not yes and not click.confirm(question, default=False):
            return
    elif not (sys.stdin.isatty() and click.confirm(question, default=False)):
        click.echo("not revoked (add --revoke to revoke it)")
        return
    click.echo(_revoke(settings, owner))


def _revoke(settings: Any, owner: TokenOwner) -> str:
    """A regular key is deleted; a master key gets a new token (it cannot be deleted)."""
    async def work(services: Services) -> str:
        master = await services.keys.master_principal(owner.user)
        if owner.record.type is KeyType.MASTER:
            view = await services.keys.regenerate(master, owner.record.name)
            return f"regenerated the master key's token; the new one: {view.token}"
        await services.keys.delete(master, owner.record.name)
        return f"deleted key {owner.record.name!r}"

    result: str = run_with_services(settings, work)
    return result
