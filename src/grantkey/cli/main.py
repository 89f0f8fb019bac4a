"""`grantkey`: serve the APIs and manage users and keys from the command line."""

from __future__ import annotations

import click

from grantkey import __version__
from grantkey.cli.audit import audit
from grantkey.cli.data import data
from grantkey.cli.datasets import datasets
from grantkey.cli.jobs import jobs
from grantkey.cli.keys import keys
from grantkey.cli.serve import serve
from grantkey.cli.users import users


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="grantkey")
def main() -> None:
    """grantkey: a data API server where every API key is a PostgreSQL role.

    Every command works on the embedded PostgreSQL under --data-dir (started for the
    command if no server is running) or on --database-url.
    """


main.add_command(serve)
main.add_command(users)
main.add_command(keys)
main.add_command(datasets)
main.add_command(audit)
main.add_command(data)
main.add_command(jobs)
