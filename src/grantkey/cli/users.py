"""`grantkey users`: create, list and delete users."""

from __future__ import annotations

import json
from pathlib import Path

import click

from grantkey.cli.common import (
    cluster_options,
    fail,
    load_settings,
    print_table,
    run_with_services,
    visible,
)
from grantkey.domain.keys import User
from grantkey.domain.names import check_username
from grantkey.errors import InvalidUsername
from grantkey.services.container import Services
from grantkey.services.repair import RepairReport
from grantkey.services.users import CreatedUser


def _user_json(user: User) -> dict[str, str]:
    return {"username": user.username, "database": user.database,
            "created_at": user.created_at.isoformat()}


@click.group()
def users() -> None:
    """Create, list and delete users (each gets its own database and built-in keys)."""


@users.command("create")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@cluster_options
def create(name: str, as_json: bool, data_dir: Path | None, database_url: str | None) -> None:
    """Create user NAME: its database, roles, master key and default public key.

    NAME: 1-63 lowercase letters, digits and '-', starting with a letter or digit.
    Prints the master key's token (keep it secret).
    """
    try:
        check_username(name)
    except InvalidUsername as error:
        fail(str(error), 2)
    settings = load_settings(data_dir, database_url)

    async def work(services: Services) -> CreatedUser:
        return await services.users.create(name)

    created = run_with_services(settings, work)
    if as_json:
        document = _user_json(created.user) | {"master_token": created.master_token}
        click.echo(json.dumps(document))
    else:
        click.echo(f"created user {created.user.username}")
        click.echo(f"master token: {created.master_token}")


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@cluster_options
def list_(as_json: bool, data_dir: Path | None, database_url: str | None) -> None:
    """List every user."""
    settings = load_settings(data_dir, database_url)

    async def work(services: Services) -> list[User]:
        return await services.users.all()

    found = run_with_services(settings, work)
    if as_json:
        click.echo(json.dumps([_user_json(user) for user in found]))
        return
    print_table(["username", "database", "created_at"],
                [[user.username, user.database, user.created_at.isoformat(timespec="seconds")]
                 for user in found])


@users.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Confirm: the user's database and keys are destroyed.")
@cluster_options
def delete(name: str, yes: bool, data_dir: Path | None, database_url: str | None) -> None:
    """Delete user NAME with its database, tables, roles and keys (needs --yes)."""
    if not yes:
        fail(f"deleting '{name}' destroys its database and every key; add --yes to confirm", 2)
    settings = load_settings(data_dir, database_url)

    async def work(services: Services) -> None:
        await services.users.delete(name)

    run_with_services(settings, work)
    click.echo(f"deleted user {name}")


@users.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@cluster_options
def repair(name: str, as_json: bool, data_dir: Path | None, database_url: str | None) -> None:
    """Restore the roles of user NAME's keys: each role's password from its key's token,
    and any role settings a client made with ALTER ROLE ... SET removed.

    Keys whose token is not stored (GRANTKEY_STORE_TOKENS=false) get their settings reset
    only; regenerate them to restore their password."""
    settings = load_settings(data_dir, database_url)

    async def work(services: Services) -> RepairReport:
        return await services.repair.repair_user(await services.users.get(name))

    report = run_with_services(settings, work)
    if as_json:
        click.echo(json.dumps({"restored": report.restored, "unknown_token": report.unknown_token}))
        return
    click.echo(f"restored {len(report.restored)} key role(s) of {name}")
    for key in report.unknown_token:
        click.echo(f"token not stored, settings reset only: {visible(key)}", err=True)
