"""Maps API tiles against the floor, side by side in one run (issue 13, speed).

Run: python bench/tiles.py [--duration 10] [--runs 3] [--points 1000000]
Needs wrk and a PostgreSQL with PostGIS (Debian: apt-get install wrk postgresql-postgis).

A table of `--points` points (normally spread around Paris, sigma 1 degree, with a GiST index
on the_geom_webmercator), one layergroup made with a regular key (`maps`, SELECT on the
table), and its tiles fetched at zooms 0, 8 and 14 through the URL the layergroup's answer
gives (with its tile token). The floor: the very statement grantkey runs for those tiles
(`db/tiles.tile_query`), on one pooled connection per worker logged in as the owner, served
by uvicorn with as many workers (floor_app.py's /tile; /tile-unprepared, the same without
psycopg's prepared statements, which grantkey cannot keep across its sessions' resets, is
shown for context). Zoom 14 cycles over the 16 tiles
around the centre with 64 connections (the target: at least 0.8 of the floor; a warm tile's
p50 at most 20 ms); zooms 0 and 8 draw hundreds of thousands of points per tile and run
with fewer connections (see the report). Rounds alternate floor and grantkey; each ratio is
against the floor of the same round.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
from common import BenchServer, machine, write_result
from psycopg import sql
from throughput import lua, stolen_seconds

from grantkey.cli.embedded import EmbeddedPostgres
from grantkey.db.tiles import LayerShape, tile_query
from grantkey.domain.mapconfig import parse_mapconfig
from grantkey.domain.secrets_box import SecretBox

HERE = Path(__file__).parent
CENTRE = (2.35, 48.85)  # lon, lat
LAYER_SQL = "SELECT id, the_geom_webmercator FROM pts"
# (zoom, wrk connections, how many tiles around the centre per side); zoom 14 with one
# connection too: a warm tile's own latency, no queue
ZOOMS = [(0, 2, 1), (8, 8, 2), (14, 64, 4), (14, 1, 4)]
LOAD = """
CREATE TABLE pts AS
SELECT g AS id, ST_Transform(ST_SetSRID(ST_MakePoint(
         {lon} + sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random()),
         {lat} + sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random())), 4326), 3857)
       AS the_geom_webmercator
FROM generate_series(1, {points}) g;
CREATE INDEX ON pts USING gist (the_geom_webmercator);
ANALYZE pts;
"""


def tile_of(lon: float, lat: float, zoom: int) -> tuple[int, int]:
    n = 2 ** zoom
    x = int((lon + 180) / 360 * n)
    y = int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n)
    return x, y


def tiles_around(zoom: int, side: int) -> list[tuple[int, int, int]]:
    x, y = tile_of(*CENTRE, zoom)
    start = side // 2
    return [(zoom, x - start + dx, y - start + dy) for dx in range(side) for dy in range(side)
            if 0 <= x - start + dx < 2 ** zoom and 0 <= y - start + dy < 2 ** zoom]


def wrk(url: str, duration: int, connections: int, script: str) -> dict[str, float]:
    command = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s",
               "--latency", "--timeout", "60s", "-s", script, url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}

    def percentile(name: str) -> float:
        found = re.search(rf"{name}%\s+([\d.]+)(us|ms|s)", out)
        return float(found.group(1)) * scale[found.group(2)] if found else float("nan")

    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": percentile("50"), "p99_ms": percentile("99"),
            "non2xx": float(bad.group(1)) if bad else 0.0}


def cycle_script(paths: list[str]) -> str:
    listing = ", ".join(f'"{p}"' for p in paths)
    return lua(f"paths = {{{listing}}}\ni = 0\nrequest = function()\n  i = i + 1\n"
               "  return wrk.format('GET', paths[(i % #paths) + 1])\nend\n")


def setup(server: BenchServer, points: int) -> dict[str, object]:
    master = str(server.cli("users", "create", "bench")["master_token"])
    embedded = EmbeddedPostgres(server.data_dir)
    with psycopg.connect(embedded.admin_url, dbname="grantkey") as conn:
        database, owner = conn.execute(
            "SELECT database, owner_role FROM users WHERE username = 'bench'").fetchone()
    started = time.monotonic()
    with psycopg.connect(embedded.superuser_url, dbname=database, autocommit=True) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(owner)))
        conn.execute(LOAD.format(lon=CENTRE[0], lat=CENTRE[1], points=points).encode())
    print(f"{points:,} points loaded and indexed in {time.monotonic() - started:.0f} s")
    http = httpx.Client(timeout=120)
    key = http.post(f"{server.url}/user/bench/api/v3/api_keys", params={"api_key": master},
                    json={"name": "map", "grants": [
                        {"type": "apis", "apis": ["maps"]},
                        {"type": "database", "tables": [
                            {"schema": "public", "name": "pts", "permissions": ["select"]}]}]})
    config = {"layers": [{"type": "mapnik", "id": "pts", "options": {"sql": LAYER_SQL}}]}
    made = http.post(f"{server.url}/user/bench/api/v1/map", json=config,
                     params={"api_key": key.json()["token"]})
    made.raise_for_status()
    template = made.json()["metadata"]["tilejson"]["vector"]["tiles"][0]
    secret = (server.data_dir / "secret").read_text().strip().encode()
    password = SecretBox(secret).role_password(owner, master)
    parsed = parse_mapconfig(config, max_sql_bytes=10_000)
    shape = LayerShape(3857, ("the_geom_webmercator",), (("id", "plain"),))
    statement = tile_query([(parsed.layers[0], shape)])
    return {"template": template, "statement": statement,
            "floor": (f"host={embedded.socket_dir} port=5432 dbname={database} user={owner} "
                      f"password={password}")}


def start_floor(conninfo: str, statement: str, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = 18766
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "floor_app:app", "--workers", str(workers),
         "--port", str(port), "--no-access-log", "--log-level", "warning"],
        cwd=HERE, env={**os.environ, "BENCH_FLOOR_CONNINFO": conninfo,
                       "BENCH_TILE_SQL": statement})
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(url + "/tile/0/0/0", timeout=60).status_code in (200, 204):
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("floor did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with BenchServer(workers=args.workers) as server:
        ready = setup(server, args.points)
        floor, floor_url = start_floor(str(ready["floor"]), str(ready["statement"]),
                                       args.workers)
        try:
            template = str(ready["template"])
            base, _, query = template.partition("?")
            for zoom, connections, side in ZOOMS:
                tiles = tiles_around(zoom, side)
                ours = cycle_script([
                    "/" + base.split("/", 3)[3].replace("{z}", str(z)).replace(
                        "{x}", str(x)).replace("{y}", str(y)) + "?" + query
                    for z, x, y in tiles])
                floors = cycle_script([f"/tile/{z}/{x}/{y}" for z, x, y in tiles])
                unprepared = cycle_script([f"/tile-unprepared/{z}/{x}/{y}" for z, x, y in tiles])
                sizes = [len(httpx.get(f"{floor_url}/tile/{z}/{x}/{y}", timeout=120).content)
                         for z, x, y in tiles]
                runs: dict[str, list[dict[str, float]]] = {"floor": [], "unprepared": [],
                                                           "grantkey": []}
                stolen = 0.0
                for number in range(args.runs):
                    order = [("floor", floor_url, floors), ("unprepared", floor_url, unprepared),
                             ("grantkey", server.url, ours)]
                    for name, url, script in order if number % 2 == 0 else order[::-1]:
                        before = stolen_seconds()
                        runs[name].append(wrk(url, args.duration, connections, script))
                        stolen += stolen_seconds() - before
                        print(zoom, name, runs[name][-1], flush=True)
                rows.append((zoom, connections, len(tiles), statistics.median(sizes), runs,
                             100 * stolen / ((os.cpu_count() or 1) * args.duration
                                             * args.runs * 3)))
        finally:
            floor.terminate()
            floor.wait(30)
    report(rows, args)


def report(rows: list[tuple[int, int, int, float, dict[str, list[dict[str, float]]], float]],
           args: argparse.Namespace) -> None:
    lines = ["# Maps API tiles against the floor", "",
             *(f"- {k}: {v}" for k, v in machine().items()),
             f"- {args.points:,} points (normal around {CENTRE}, sigma 1 degree), GiST index; "
             "one layer (`" + LAYER_SQL + "`), a regular key's layergroup, tiles fetched "
             "with its tile token; the floor runs the same statement on one pooled connection "
             f"per worker; both --workers {args.workers}; wrk -t2 -d{args.duration}s, "
             f"{args.runs} rounds alternating; medians of the rounds, ratios medians of "
             "each round's ratio to that round's floor", "",
             "| zoom | connections | tiles cycled | median tile bytes | floor tiles/s | "
             "grantkey tiles/s | ratio | floor p50 ms | grantkey p50 ms | floor p99 ms | "
             "grantkey p99 ms | non-2xx | unprepared floor tiles/s (context) | steal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for zoom, connections, count, size, runs, steal in rows:
        floor, ours = runs["floor"], runs["grantkey"]

        def median(runs: list[dict[str, float]], key: str) -> float:
            return statistics.median(r[key] for r in runs)

        ratio = statistics.median(o["rps"] / f["rps"] for o, f in zip(ours, floor, strict=True))
        lines.append(
            f"| {zoom} | {connections} | {count} | {size:,.0f} | {median(floor, 'rps'):,.1f} | "
            f"{median(ours, 'rps'):,.1f} | {ratio:.2f} | {median(floor, 'p50_ms'):.1f} | "
            f"{median(ours, 'p50_ms'):.1f} | {median(floor, 'p99_ms'):.1f} | "
            f"{median(ours, 'p99_ms'):.1f} | {sum(r['non2xx'] for r in ours):.0f} | "
            f"{median(runs['unprepared'], 'rps'):,.1f} | {steal:.0f}% |")
    write_result("tiles", lines)


if __name__ == "__main__":
    main()
