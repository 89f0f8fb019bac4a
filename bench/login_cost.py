"""What a key-role login costs (issue 11 item 3), against a query on a connection already
open: a new PostgreSQL session as a key's role (SCRAM with grantkey's 16 iterations, its
pinned session options), the same without the options, and one trusted login; alternating
rounds, medians.

    .venv/bin/python bench/login_cost.py [--logins 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result

from grantkey.cli.embedded import EmbeddedPostgres
from grantkey.db.bootstrap import bootstrap
from grantkey.services.container import Services
from grantkey.settings import Settings


def key_conninfo(pg: EmbeddedPostgres, home: Path) -> str:
    async def make() -> str:
        await bootstrap(pg.admin_url)
        services = Services(Settings(data_dir=home, database_url=pg.admin_url, secret="b" * 64),
                            pg.admin_url)
        await services.open(migrate=False)
        try:
            made = await services.users.create("bench")
            master = await services.keys.master_principal(made.user)
            view = await services.keys.create(master, "k", [{"type": "apis", "apis": ["sql"]}])
            assert view.token is not None
            principal = await services.resolver.resolve(made.user, view.token, fresh=True)
            return services.sql.target_for(principal).conninfo
        finally:
            await services.close()

    return asyncio.run(make())


def timed(action: object, count: int) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        action()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="gkbench-login-"))
    pg = EmbeddedPostgres(home / "pg")
    try:
        pg.start()
        conninfo = key_conninfo(pg, home)
        bare = conninfo_to_dict(conninfo)
        bare.pop("options", None)
        without_options = make_conninfo("", **bare)

        def login(info: str) -> object:
            return lambda: psycopg.connect(info, autocommit=True).close()

        open_conn = psycopg.connect(conninfo, autocommit=True)
        sides = {"SELECT 1 on an open key-role session": lambda: open_conn.execute("SELECT 1"),
                 "key-role login (SCRAM, pinned options)": login(conninfo),
                 "key-role login without the options": login(without_options),
                 "trusted admin login (no password)": login(pg.admin_url)}
        results: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, action in sides.items():
                results[name].append(timed(action, args.logins))
        open_conn.close()
    finally:
        pg.stop()
        shutil.rmtree(home, ignore_errors=True)
    query = statistics.median(results["SELECT 1 on an open key-role session"])
    lines = ["# The cost of a key-role login", "", *(f"- {k}: {v}" for k, v in machine().items()),
             f"- {args.logins} of each per round, {args.rounds} rounds, alternating; median of "
             "the rounds' medians, client side (the connection's whole round trips)", "",
             "| what | ms | × SELECT 1 on an open session |", "|---|---|---|"]
    for name, values in results.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median * 1000:.2f} | {median / query:.0f} |")
    write_result("login-cost", lines)


if __name__ == "__main__":
    main()
