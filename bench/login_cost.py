"""What a key-role login costs (issue 11 item 3), against a query on a connection already
open: a new PostgreSQL session as a key's role (SCRAM with grantkey's 16 iterations, its
pinned session options), the same without the options, and one trusted login; alternating
rounds, medians. Then how many logins a second the machine can make with every core busy,
by the leanest client there is (PostgreSQL's own pgbench, `-C`: a new session for each
`SELECT 1`, one client per core), with no other session open and with thousands open and
idle, as a pool holding many keys keeps them.

    .venv/bin/python bench/login_cost.py [--logins 200] [--rounds 5] [--idle 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result

from grantkey.cli.embedded import ROUTINE_ROLE, EmbeddedPostgres
from grantkey.db.bootstrap import bootstrap, prepare_routine_admin
from grantkey.services.container import Services
from grantkey.settings import Settings


def key_conninfo(pg: EmbeddedPostgres, home: Path) -> str:
    async def make() -> str:
        await prepare_routine_admin(pg.superuser_url, ROUTINE_ROLE)
        await bootstrap(pg.admin_url)
        services = Services(Settings(data_dir=home, database_url=pg.admin_url, secret="b" * 64,
                                     superuser_url=pg.superuser_url),
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


def find_pgbench() -> str | None:
    found = shutil.which("pgbench") or sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def login_rate(pgbench: str, conninfo: str, seconds: int) -> float:
    """Sessions a second: `pgbench -C` with one client per core, each a login and SELECT 1."""
    info = conninfo_to_dict(conninfo)
    cores = str(os.cpu_count() or 1)
    env = {**os.environ, "PGPASSWORD": str(info.get("password", "")),
           "PGOPTIONS": str(info.get("options", ""))}
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
        script.write("SELECT 1\n")
        script.flush()
        out = subprocess.run(
            [pgbench, "-n", "-C", "-c", cores, "-j", cores, "-T", str(seconds), "-f", script.name,
             "-h", str(info["host"]), "-p", str(info.get("port", 5432)), "-U", str(info["user"]),
             str(info["dbname"])], env=env, capture_output=True, text=True, check=True).stdout
    match = re.search(r"tps = ([0-9.]+)", out)
    assert match, out
    return float(match.group(1))


def rates_with_idle(pgbench: str, pg: EmbeddedPostgres, conninfo: str,
                    idle: int, rounds: int) -> list[str]:
    """Login rates (trusted admin, key role) with no session open, then with `idle` open."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    for open_count in (0, idle):
        held = []
        try:
            for _ in range(open_count):
                conn = psycopg.connect(pg.admin_url, autocommit=True)
                held.append(conn)
                conn.execute("SELECT 1")
            trusted = statistics.median(login_rate(pgbench, pg.admin_url, 6) for _ in range(rounds))
            keyed = statistics.median(login_rate(pgbench, conninfo, 6) for _ in range(rounds))
        finally:
            for conn in held:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
        cores = os.cpu_count() or 1
        rows.append(f"| {open_count:,} | {trusted:,.0f} | {1000 * cores / trusted:.1f} | "
                    f"{keyed:,.0f} | {1000 * cores / keyed:.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logins", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle", type=int, default=3000,
                        help="idle sessions held open for the second login-rate measurement")
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
        pgbench = find_pgbench()
        rates = rates_with_idle(pgbench, pg, conninfo, args.idle, 3) if pgbench else []
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
    if rates:
        lines += ["", "Logins a second with every core busy: pgbench -C (a session for each "
                  "SELECT 1), one client per core, 6 s runs, median of 3; CPU ms per login = "
                  "cores × 1000 / rate (the whole machine: client, PostgreSQL, kernel).", "",
                  "| idle sessions open | trusted logins/s | CPU ms each | key-role logins/s | "
                  "CPU ms each |", "|---|---|---|---|---|", *rates]
    write_result("login-cost", lines)


if __name__ == "__main__":
    main()
