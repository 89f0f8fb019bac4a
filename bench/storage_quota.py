"""What the storage quota's trigger costs a write: one-row INSERT latency with the trigger
skipped (the floor: `session_replication_role = replica`, as a superuser), with the quota
off (the trigger reads one row) and on (it also measures the database), in a database of
10 and of 1,000 tables; in alternating rounds, each ratio against the floor of its round.

    .venv/bin/python bench/storage_quota.py [--statements 2000] [--rounds 5]
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
from psycopg import sql

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result

from grantkey.cli.embedded import ROUTINE_ROLE, EmbeddedPostgres
from grantkey.db.bootstrap import bootstrap, prepare_routine_admin
from grantkey.services.container import Services
from grantkey.settings import Settings

MODES = ("floor", "quota off", "quota on")


def make_user(pgdata: Path) -> tuple[str, str, str]:
    pg = EmbeddedPostgres(pgdata)
    pg.start()

    async def create() -> tuple[str, str]:
        await prepare_routine_admin(pg.superuser_url, ROUTINE_ROLE)
        await bootstrap(pg.admin_url)
        services = Services(Settings(data_dir=pgdata, database_url=pg.admin_url,
                                     secret="b" * 64, superuser_url=pg.superuser_url),
                            pg.admin_url)
        await services.open(migrate=False)
        try:
            made = await services.users.create("bench")
            return made.user.database, made.user.owner_role
        finally:
            await services.close()

    database, owner = asyncio.run(create())
    return pg.superuser_url, database, owner


def latencies(conn: psycopg.Connection[tuple[object, ...]], owner: str, mode: str,
              count: int) -> list[float]:
    """As the user's owner role (the master), from a superuser session."""
    conn.execute("RESET ROLE")
    conn.execute("SET session_replication_role = " + ("replica" if mode == "floor" else "origin"))
    limit = "100GB" if mode == "quota on" else None
    conn.execute("UPDATE grantkey_meta.storage_quota SET limit_bytes = pg_size_bytes(%s)", [limit])
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(owner)))
    times = []
    for index in range(count):
        started = time.perf_counter()
        conn.execute("INSERT INTO public.t0 VALUES (%s, 'x')", [index])
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--statements", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="gkbench-quota-"))
    pg = EmbeddedPostgres(home / "pg")
    try:
        admin_url, database, owner = make_user(home / "pg")
        lines = ["# Storage quota: cost of its trigger on a one-row INSERT", "",
                 *(f"- {k}: {v}" for k, v in machine().items()), "",
                 f"{args.statements} statements per side and round, {args.rounds} rounds; "
                 "median latency in µs; ratio to the floor of the same round (median of "
                 "rounds)", "", "| tables | floor µs | quota off µs | ratio | quota on µs | ratio |",
                 "|---|---|---|---|---|---|"]
        with psycopg.connect(admin_url, dbname=database, autocommit=True) as conn:
            made = 0
            for tables in (10, 1000):
                conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(owner)))
                for index in range(made, tables):
                    conn.execute(sql.SQL("CREATE TABLE public.{} (id int, pad text)").format(
                        sql.Identifier(f"t{index}")))
                made = tables
                medians: dict[str, list[float]] = {mode: [] for mode in MODES}
                ratios: dict[str, list[float]] = {mode: [] for mode in MODES}
                for _ in range(args.rounds):
                    floor = 0.0
                    for mode in MODES:
                        median = statistics.median(latencies(conn, owner, mode,
                                                                args.statements))
                        medians[mode].append(median)
                        floor = median if mode == "floor" else floor
                        ratios[mode].append(median / floor)
                row = [statistics.median(medians[m]) * 1e6 for m in MODES]
                lines.append(
                    f"| {tables} | {row[0]:.0f} | {row[1]:.0f} | "
                    f"{statistics.median(ratios['quota off']):.2f} | {row[2]:.0f} | "
                    f"{statistics.median(ratios['quota on']):.2f} |")
        write_result("storage-quota", lines)
    finally:
        pg.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
