"""`grantkey jobs`: a user's batch SQL jobs (list, show, cancel), as the user's master key."""

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
from grantkey.services.container import Services


@click.group()
def jobs() -> None:
    """A user's batch SQL jobs: list them, show one, cancel one."""


def _summary(query: Any) -> str:
    text = query if isinstance(query, str) else json.dumps(query)
    return text if len(text) <= 60 else text[:59] + "…"


@jobs.command("list")
@click.argument("username")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of the jobs.")
@cluster_options
def list_(username: str, as_json: bool, data_dir: Path | None, database_url: str | None) -> None:
    """List USERNAME's batch jobs, newest first (every key's)."""

    async def work(services: Services) -> list[dict[str, Any]]:
        master = await services.keys.master_principal(await services.users.get(username))

        async def fetch(page: int) -> tuple[list[dict[str, Any]], int]:
            total, found = await services.jobs.list(master, page, 1000)
            return found, total

        return await every_page(fetch)

    found = run_with_services(load_settings(data_dir, database_url), work)
    if as_json:
        click.echo(json.dumps(found))
        return
    print_table(["job_id", "status", "created_at", "query"],
                [[job["job_id"], job["status"], job["created_at"], _summary(job["query"])]
                 for job in found])


@jobs.command("show")
@click.argument("username")
@click.argument("job_id")
@cluster_options
def show(username: str, job_id: str, data_dir: Path | None, database_url: str | None) -> None:
    """Print USERNAME's job JOB_ID as the HTTP API shows it (JSON)."""

    async def work(services: Services) -> dict[str, Any]:
        master = await services.keys.master_principal(await services.users.get(username))
        return await services.jobs.get(master, job_id)

    click.echo(json.dumps(run_with_services(load_settings(data_dir, database_url), work),
                          indent=2))


@jobs.command("cancel")
@click.argument("username")
@click.argument("job_id")
@cluster_options
def cancel(username: str, job_id: str, data_dir: Path | None, database_url: str | None) -> None:
    """Cancel USERNAME's pending or running job JOB_ID (a running one's query is cancelled
    in PostgreSQL)."""

    async def work(services: Services) -> dict[str, Any]:
        master = await services.keys.master_principal(await services.users.get(username))
        return await services.jobs.cancel(master, job_id)

    job = run_with_services(load_settings(data_dir, database_url), work)
    click.echo(f"job {job['job_id']} is {job['status']}")
