"""COPY through grantkey against psql's \\copy, side by side in one run (issue 14, speed and
memory).

Run: python bench/copy_bench.py [--rows 10000000] [--runs 3]
Needs psql (Debian: postgresql-client, installed with the server) and curl.

One CSV file of `--rows` rows (about 100 bytes each: 10,000,000 rows make about 1 GB) and
its gzip (level 1, what the SDK sends). Each round, in alternating order: psql `\\copy t FROM
'file'` logged in as the key's own role over the same Unix socket (the floor), grantkey's
copyfrom of the plain file and of the gzip one (chunked uploads of 1 MiB pieces, a regular
key with INSERT), then psql `\\copy t TO '/dev/null'` against grantkey's copyto read to its
end by curl (a C client, as psql is) into /dev/null. The table is emptied (TRUNCATE, as its
owner) before each upload. MB/s counts the uncompressed CSV; the server's RSS (its processes,
PostgreSQL excluded) is sampled every 20 ms and reported as the peak above its idle size.
Targets: >= 0.8 of psql both ways; RSS within 50 MB of idle.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
from common import BenchServer, machine, write_result
from psycopg import sql
from stream_memory import tree_rss

from grantkey.cli.embedded import EmbeddedPostgres
from grantkey.domain.secrets_box import SecretBox

TABLE = "CREATE TABLE rows (id bigint, name text, value double precision, at timestamptz, note text)"
CHUNK = 1 << 20


def write_csv(path: Path, rows: int) -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    rng = random.Random(14)
    with path.open("w") as out:
        for start in range(0, rows, 100_000):
            lines = []
            for i in range(start, min(rows, start + 100_000)):
                lines.append(f"{i},{rng.getrandbits(128):032x},{rng.random() * 1e6:.6f},"
                             f"2026-12-01 {i % 24:02d}:{i % 60:02d}:{i % 59:02d}+00,"
                             f"\"{rng.choice(words)} {rng.choice(words)}, {i % 997}\"\n")
            out.write("".join(lines))


class Peak:
    """The server's RSS peak above idle while a block runs (a sampling thread)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.idle = tree_rss(pid)
        self.peak = self.idle
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *args: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def above_idle_mb(self) -> float:
        return (self.peak - self.idle) / 2**20


def pieces(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            yield block


def timed(work: Callable[[], object]) -> float:
    started = time.monotonic()
    work()
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work_dir = Path(tempfile.mkdtemp(prefix="gkcopy-"))
    csv_path, gz_path = work_dir / "rows.csv", work_dir / "rows.csv.gz"
    started = time.monotonic()
    write_csv(csv_path, args.rows)
    with csv_path.open("rb") as source, gzip.open(gz_path, "wb", compresslevel=1) as target:
        shutil.copyfileobj(source, target, CHUNK)
    size_mb = csv_path.stat().st_size / 1e6
    print(f"{args.rows:,} rows, {size_mb:,.0f} MB ({gz_path.stat().st_size / 1e6:,.0f} MB "
          f"gzipped) made in {time.monotonic() - started:.0f} s", flush=True)
    results: dict[str, list[float]] = {name: [] for name in (
        "psql_in", "grantkey_in", "grantkey_gzip_in", "psql_out", "grantkey_out")}
    memory: dict[str, list[float]] = {"in": [], "gzip_in": [], "out": []}
    try:
        with BenchServer(workers=1) as server:
            master = str(server.cli("users", "create", "bench")["master_token"])
            embedded = EmbeddedPostgres(server.data_dir)
            with psycopg.connect(embedded.admin_url, dbname="grantkey") as conn:
                database, owner = conn.execute(
                    "SELECT database, owner_role FROM users WHERE username = 'bench'").fetchone()
            owner_conn = psycopg.connect(embedded.superuser_url, dbname=database, autocommit=True)
            owner_conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(owner)))
            owner_conn.execute(TABLE)
            key = httpx.post(f"{server.url}/user/bench/api/v3/api_keys", params={"api_key": master},
                             json={"name": "loader", "grants": [
                                 {"type": "apis", "apis": ["sql"]},
                                 {"type": "database", "tables": [{"schema": "public", "name": "rows",
                                                                  "permissions": ["select", "insert"]}]}]},
                             timeout=60).json()
            token = key["token"]
            with psycopg.connect(embedded.superuser_url, dbname=database) as conn:
                role = conn.execute(
                    "SELECT role FROM grantkey_meta.api_keys WHERE name = 'loader'").fetchone()[0]
            secret = (server.data_dir / "secret").read_text().strip().encode()
            env = {**os.environ, "PGPASSWORD": SecretBox(secret).role_password(role, token)}
            psql = [str(embedded.bin / "psql"), "-X", "-q", "-h", str(embedded.socket_dir),
                    "-p", "5432", "-U", role, "-d", database, "-v", "ON_ERROR_STOP=1", "-c"]
            base = f"{server.url}/user/bench/api/v2/sql"
            copy_in = {"api_key": token, "q": "COPY rows FROM STDIN WITH (FORMAT csv)"}

            def psql_in() -> None:
                subprocess.run([*psql, f"\\copy rows FROM '{csv_path}' WITH (FORMAT csv)"],
                               env=env, check=True)

            def upload(path: Path, headers: dict[str, str]) -> None:
                answer = httpx.post(f"{base}/copyfrom", params=copy_in, content=pieces(path),
                                    headers=headers, timeout=3600)
                answer.raise_for_status()
                assert answer.json()["total_rows"] == args.rows, answer.text

            def psql_out() -> None:
                subprocess.run([*psql, "\\copy rows TO '/dev/null' WITH (FORMAT csv)"], env=env,
                               check=True)

            out_size: list[int] = []

            def download() -> None:
                """curl, a client in C as psql is (httpx's own CPU would count against us on
                2 cores), the data to /dev/null."""
                url = httpx.URL(f"{base}/copyto", params={
                    "api_key": token, "q": "COPY rows TO STDOUT WITH (FORMAT csv)"})
                done = subprocess.run(["curl", "-sS", "--fail", "-o", "/dev/null", "-w",
                                       "%{size_download}", str(url)], capture_output=True,
                                      text=True, check=True)
                out_size.append(int(done.stdout))

            uploads: list[tuple[str, Callable[[], object], str | None]] = [
                ("psql_in", psql_in, None),
                ("grantkey_in", lambda: upload(csv_path, {}), "in"),
                ("grantkey_gzip_in", lambda: upload(gz_path, {"Content-Encoding": "gzip"}),
                 "gzip_in")]
            for number in range(args.runs):
                for name, work, kind in uploads if number % 2 == 0 else uploads[::-1]:
                    owner_conn.execute("TRUNCATE rows")
                    with Peak(server.process.pid) as peak:
                        seconds = timed(work)
                    results[name].append(size_mb / seconds)
                    if kind is not None:
                        memory[kind].append(peak.above_idle_mb)
                    print(number, name, f"{size_mb / seconds:.1f} MB/s", flush=True)
            owner_conn.execute("VACUUM ANALYZE rows")
            downloads: list[tuple[str, Callable[[], object]]] = [
                ("psql_out", psql_out), ("grantkey_out", download)]
            download()  # PostgreSQL's own rendering of the rows: the size both download
            out_mb = out_size[0] / 1e6
            for number in range(args.runs):
                for name, work in downloads if number % 2 == 0 else downloads[::-1]:
                    with Peak(server.process.pid) as peak:
                        seconds = timed(work)
                    results[name].append(out_mb / seconds)
                    if name == "grantkey_out":
                        memory["out"].append(peak.above_idle_mb)
                    print(number, name, f"{out_mb / seconds:.1f} MB/s", flush=True)
            owner_conn.close()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report(args, size_mb, results, memory)


def report(args: argparse.Namespace, size_mb: float, results: dict[str, list[float]],
           memory: dict[str, list[float]]) -> None:
    def median(name: str) -> float:
        return statistics.median(results[name])

    def ratio(ours: str, floor: str) -> float:
        return statistics.median(o / f for o, f in zip(results[ours], results[floor], strict=True))

    lines = ["# COPY through grantkey against psql's \\copy", "",
             *(f"- {k}: {v}" for k, v in machine().items()),
             f"- {args.rows:,} rows, {size_mb:,.0f} MB of CSV; a regular key (INSERT, SELECT), "
             "psql logged in as the same key role over the same Unix socket; grantkey "
             f"--workers 1; copyto read by curl; {args.runs} rounds, order alternating; "
             "medians of the rounds, ratios medians of each round's ratio; MB/s of uncompressed "
             "CSV (copyto: of PostgreSQL's output); RSS: the server's processes (PostgreSQL "
             "excluded), peak above idle", "",
             "| direction | psql MB/s | grantkey MB/s | ratio | grantkey peak RSS above idle (MB) |",
             "|---|---|---|---|---|",
             f"| copyfrom (plain) | {median('psql_in'):.1f} | {median('grantkey_in'):.1f} | "
             f"{ratio('grantkey_in', 'psql_in'):.2f} | {max(memory['in']):.1f} |",
             f"| copyfrom (gzip level 1) | {median('psql_in'):.1f} | "
             f"{median('grantkey_gzip_in'):.1f} | {ratio('grantkey_gzip_in', 'psql_in'):.2f} | "
             f"{max(memory['gzip_in']):.1f} |",
             f"| copyto | {median('psql_out'):.1f} | {median('grantkey_out'):.1f} | "
             f"{ratio('grantkey_out', 'psql_out'):.2f} | {max(memory['out']):.1f} |"]
    write_result("copy", lines)


if __name__ == "__main__":
    main()
