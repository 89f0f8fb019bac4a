"""SQL API throughput and p99 latency against the floor, side by side in one run (issue 5, 1-2).

Run: python bench/throughput.py [--duration 10] [--runs 3] [--keys 1000] [--big-keys 10000]
Needs wrk (Debian: apt-get install wrk). Both servers run with --workers 2 (or --workers N) on
127.0.0.1, grantkey with its default settings; wrk uses 2 threads and 64 connections.

Each many-keys run follows runs of `--warmup` seconds of the same traffic (not counted) until
logins fall under 2% of the requests, six at most: it measures the steady state. What a
cold pool costs is shown apart, by the order check: on a fresh server, round-robin on an
empty pool (cold), then warmed up like the other runs (fresh: no other history), then Zipf
(warmed up too), then round-robin straight after it (after), which must stay within 10% of
fresh.

The configurations of one query run in rounds (floor, then each client; the order of the
clients reversed every other round), and each ratio is taken against the floor of the same
round: on a virtual machine whose CPU time is partly stolen by the host, runs made minutes
apart are not comparable. The report gives the median of those paired ratios and the share
of CPU time the host stole during the runs.

`--key-features` (issue 15) adds the comparison its target is about, closer still: the
key with an expiry, an IP restriction and a rate limit against the regular key in quads of
short runs back to back (regular, guarded, guarded, regular), each quad's ratio the sum of
the guarded runs over the sum of the regular ones (a steady drift of the host's speed
cancels). A control does the same with two regular keys of the same grants: its spread is
the method's own noise.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx
import psycopg
from common import BenchServer, machine, write_result

from grantkey.cli.embedded import EmbeddedPostgres
from grantkey.domain.secrets_box import SecretBox

HERE = Path(__file__).parent
QUERIES = {"SELECT 1": "SELECT 1 AS x", "10 rows": "SELECT id FROM ten"}


def wrk(url: str, duration: int, script: str | None = None) -> dict[str, float]:
    command = ["wrk", "-t2", "-c64", f"-d{duration}s", "--latency", url]
    if script:
        command[1:1] = ["-s", script]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    latency = float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p99_ms": latency, "non2xx": float(bad.group(1)) if bad else 0.0,
            "socket_errors": 1.0 if errors else 0.0}


def lua(body: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(body)
    return handle.name


def median_of(runs: list[dict[str, float]], floors: list[dict[str, float]]) -> dict[str, float]:
    """Medians of the runs, and of the ratios to the floor run of the same round."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {
        "non2xx": sum(r["non2xx"] for r in runs),
        "rps_ratio": statistics.median(r["rps"] / f["rps"] for r, f in zip(runs, floors, strict=True)),
        "p99_ratio": statistics.median(
            r["p99_ms"] / f["p99_ms"] for r, f in zip(runs, floors, strict=True))}


def stolen_seconds() -> float:
    """CPU time the hypervisor gave to others (the `steal` column of /proc/stat)."""
    with open("/proc/stat") as stat:
        return int(stat.readline().split()[8]) / os.sysconf("SC_CLK_TCK")


def setup(server: BenchServer, keys: int) -> dict[str, object]:
    created = server.cli("users", "create", "bench")
    master = str(created["master_token"])
    sql = f"{server.url}/user/bench/api/v2/sql"
    http = httpx.Client(timeout=60)
    http.post(sql, data={"api_key": master,
                         "q": "CREATE TABLE ten AS SELECT g AS id FROM generate_series(1, 10) g"})
    http.patch(f"{server.url}/user/bench/api/v4/datasets/ten", params={"api_key": master},
               json={"privacy": "public"})
    grants = [{"type": "apis", "apis": ["sql"]}, {"type": "database", "tables": [
        {"schema": "public", "name": "ten", "permissions": ["select"]}]}]
    url = f"{server.url}/user/bench/api/v3/api_keys"

    def create(i: int) -> str:
        with httpx.Client(timeout=60) as client:
            return str(client.post(url, params={"api_key": master},
                                   json={"name": f"k{i}", "grants": grants}).json()["token"])

    with ThreadPoolExecutor(4) as pool:
        tokens = list(pool.map(create, range(keys)))
    # issue 15: an expiry, an IP restriction and a rate limit high enough never to trigger
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 365 * 86400))
    guarded = str(http.post(url, params={"api_key": master}, json={
        "name": "guarded", "grants": grants, "expires_at": expires,
        "restrictions": {"ips": ["127.0.0.0/8"]},
        "rate_limit": {"requests": 1_000_000, "per": 1, "burst": 1_000_000}}).json()["token"])
    embedded = EmbeddedPostgres(server.data_dir)
    with psycopg.connect(embedded.admin_url, dbname="grantkey") as conn:
        database, owner = conn.execute(
            "SELECT database, owner_role FROM users WHERE username = 'bench'").fetchone()
    secret = (server.data_dir / "secret").read_text().strip().encode()
    password = SecretBox(secret).role_password(owner, master)
    floor_conninfo = (f"host={embedded.socket_dir} port=5432 dbname={database} user={owner} "
                      f"password={password}")
    return {"master": master, "tokens": tokens, "sql": sql, "floor": floor_conninfo,
            "admin": embedded.admin_url, "guarded": guarded}


def start_floor(conninfo: str, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = 18765
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "floor_app:app", "--workers", str(workers),
         "--port", str(port), "--no-access-log", "--log-level", "warning"],
        cwd=HERE, env={**os.environ, "BENCH_FLOOR_CONNINFO": conninfo})
    url = f"http://127.0.0.1:{port}/floor"
    for _ in range(100):
        try:
            if httpx.get(url, params={"q": "SELECT 1 AS x"}).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("floor did not start")


def max_key_sessions(admin_url: str, stop: threading.Event, seen: list[int]) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        while not stop.is_set():
            (count,) = conn.execute("SELECT count(*) FROM pg_stat_activity "
                                    "WHERE usename ~ '^gk_.*_k'").fetchone()
            seen.append(int(count))
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--big-keys", type=int, default=10000,
                        help="keys of the large Zipf configuration (0: leave it out)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="seconds of each warm-up run of the same traffic before a "
                             "many-keys run (repeated until logins fall under 2%% of the "
                             "requests, 6 runs at most)")
    parser.add_argument("--cap", type=int, default=None,
                        help="GRANTKEY_SQL_MAX_CONNECTIONS of each worker (default: sized by "
                             "serve from the cluster; results with a cap go to "
                             "throughput-cap<N>-<date>.md)")
    parser.add_argument("--zipf", type=float, default=1.1,
                        help="popularity exponent of the Zipf configurations")
    parser.add_argument("--key-features", action="store_true",
                        help="only the floor, a regular key and a key with an expiry, an IP "
                             "restriction and a rate limit (issue 15; reported to "
                             "throughput-key-features-<date>.md)")
    parser.add_argument("--quads", type=int, default=16,
                        help="--key-features: quads of runs per paired comparison")
    parser.add_argument("--quad-duration", type=int, default=3,
                        help="--key-features: seconds of each run of a quad")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes of both servers (grantkey serve's default is 1; "
                             "other counts than 2 report to throughput-workers<N>-<date>.md)")
    args = parser.parse_args()
    env = {} if args.cap is None else {"GRANTKEY_SQL_MAX_CONNECTIONS": str(args.cap)}
    rows: list[tuple[str, str, dict[str, float]]] = []
    pairs: list[tuple[str, str, list[float]]] = []
    with BenchServer(workers=args.workers, env=env) as server:
        # --key-features: a second regular key, for the paired comparisons' control
        ready = setup(server, max(args.keys, args.big_keys, 2 if args.key_features else 0))
        floor, floor_url = start_floor(str(ready["floor"]), args.workers)
        try:
            everyone = list(ready["tokens"])  # type: ignore[call-overload]
            tokens = everyone[:args.keys]
            token = tokens[0]
            basic = base64.b64encode(f"bench:{token}".encode()).decode()
            basic_script = lua(f'wrk.headers["Authorization"] = "Basic {basic}"\n')
            for label, q in QUERIES.items():
                sql = f"{ready['sql']}?q={quote(q)}"
                configs = [
                    ("floor", f"{floor_url}?q={quote(q)}", None),
                    ("floor without prepared statements (context)",
                     f"{floor_url}-unprepared?q={quote(q)}", None),
                    ("regular key, Basic", sql, basic_script),
                    ("regular key, query string", f"{sql}&api_key={token}", None),
                    ("no key (default public)", sql, None),
                    (f"{len(tokens)} keys round-robin", sql, round_robin_script(tokens, sql)),
                    (f"{len(tokens)} keys Zipf {args.zipf:g}", sql,
                     zipf_script(tokens, urlpath(sql), args.zipf)),
                ]
                guarded = ("key with expiry, IP restriction, rate limit, query string",
                           f"{sql}&api_key={ready['guarded']}", None)
                if args.key_features:
                    configs = [configs[0], configs[3], guarded]
                else:
                    configs.insert(4, guarded)
                if args.big_keys > args.keys and not args.key_features:
                    configs.append((f"{len(everyone)} keys Zipf {args.zipf:g}", sql,
                                    zipf_script(everyone, urlpath(sql), args.zipf)))
                rows.extend(rounds(label, configs, args, str(ready["admin"])))
                if args.key_features:
                    plain, other = (f"{sql}&api_key={t}" for t in everyone[:2])
                    pairs.append((label, "guarded key / regular key",
                                  paired(plain, guarded[1], args)))
                    pairs.append((label, "regular key / another regular key (control)",
                                  paired(plain, other, args)))
        finally:
            floor.terminate()
            floor.wait(30)
    report(rows, "" if args.key_features else order_check(args, env), args, pairs)


def paired(regular: str, other: str, args: argparse.Namespace) -> list[float]:
    """`other`'s req/s over `regular`'s, a ratio per quad of runs back to back (regular,
    other, other, regular): (o1 + o2) / (r1 + r2) cancels a steady drift within the quad."""
    ratios = []
    for _ in range(args.quads):
        r1, o1, o2, r2 = (wrk(url, args.quad_duration)["rps"]
                          for url in (regular, other, other, regular))
        ratios.append((o1 + o2) / (r1 + r2))
        print("quad", f"{r1:.0f} {o1:.0f} {o2:.0f} {r2:.0f} -> {ratios[-1]:.3f}", flush=True)
    return ratios


def round_robin_script(tokens: list[str], sql: str) -> str:
    listing = ", ".join(f'"{t}"' for t in tokens)
    return lua(f"tokens = {{{listing}}}\ni = 0\nrequest = function()\n  i = i + 1\n"
               f"  return wrk.format('GET', '{urlpath(sql)}&api_key=' "
               f".. tokens[(i % #tokens) + 1])\nend\n")


Config = tuple[str, str, str | None]


def zipf_script(tokens: list[str], path: str, exponent: float) -> str:
    """wrk picks each request's key with Zipf popularity (key k with weight 1/k^s)."""
    weights = [1 / (rank ** exponent) for rank in range(1, len(tokens) + 1)]
    total, running, cdf = sum(weights), 0.0, []
    for weight in weights:
        running += weight / total
        cdf.append(f"{running:.9f}")
    listing = ", ".join(f'"{t}"' for t in tokens)
    return lua(f"tokens = {{{listing}}}\ncdf = {{{', '.join(cdf)}}}\n"
               "math.randomseed(os.time())\n"
               "request = function()\n  local r, lo, hi = math.random(), 1, #cdf\n"
               "  while lo < hi do local mid = math.floor((lo + hi) / 2)\n"
               "    if cdf[mid] < r then lo = mid + 1 else hi = mid end end\n"
               f"  return wrk.format('GET', '{path}&api_key=' .. tokens[lo])\nend\n")


def logins(admin_url: str) -> int:
    """Sessions PostgreSQL has started in every database since its start (PostgreSQL 14+)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        (count,) = conn.execute("SELECT sum(sessions) FROM pg_stat_database").fetchone()
    return int(count or 0)


def order_check(args: argparse.Namespace, env: dict[str, str]) -> str:
    """On a fresh server: round-robin on an empty pool (cold), then in its steady state
    (fresh), then Zipf (steady state too), then round-robin straight after it (after): the
    pool must not collapse whatever the order (issue 11: after within 10% of fresh). The
    10-row query."""
    with BenchServer(workers=args.workers, env=env) as server:
        ready = setup(server, args.keys)
        tokens = list(ready["tokens"])  # type: ignore[call-overload]
        sql = f"{ready['sql']}?q={quote(QUERIES['10 rows'])}"
        round_robin = round_robin_script(tokens, sql)
        popular = zipf_script(tokens, urlpath(sql), args.zipf)
        results = {}
        for name, script in (("cold", round_robin), ("fresh", round_robin),
                             ("zipf", popular), ("after", round_robin)):
            if name in ("fresh", "zipf"):  # their steady state; "after" comes straight on
                warm_up(sql, script, args, str(ready["admin"]))
            before = logins(str(ready["admin"]))
            result = wrk(sql, args.duration, script)
            result["logins_per_s"] = (logins(str(ready["admin"])) - before) / args.duration
            results[name] = result
            print("order", name, result, flush=True)
    cold, fresh, zipf, after = (results[n] for n in ("cold", "fresh", "zipf", "after"))
    return (f"| 10 rows | {cold['rps']:,.0f} | {cold['logins_per_s']:,.0f} | "
            f"{fresh['rps']:,.0f} | {fresh['logins_per_s']:,.0f} | {zipf['rps']:,.0f} | "
            f"{after['rps']:,.0f} | {after['logins_per_s']:,.0f} | "
            f"{after['rps'] / fresh['rps']:.2f} |")


def warm_up(url: str, script: str | None, args: argparse.Namespace, admin_url: str) -> None:
    """Runs of `--warmup` seconds of the same traffic until logins fall under 2% of the
    requests (the pool holds what this traffic needs), at most 6 runs."""
    for _ in range(6):
        before = logins(admin_url)
        result = wrk(url, args.warmup, script)
        if (logins(admin_url) - before) / args.warmup < 0.02 * result["rps"]:
            return


def rounds(label: str, configs: list[Config], args: argparse.Namespace,
           admin_url: str) -> list[tuple[str, str, dict[str, float]]]:
    """Every configuration once per round, the floor first; clients alternate order."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in configs}
    sessions: dict[str, list[int]] = {name: [] for name, _, _ in configs}
    stolen: dict[str, float] = dict.fromkeys(runs, 0.0)
    for number in range(args.runs):
        clients = configs[1:] if number % 2 == 0 else configs[:0:-1]
        for name, url, script in [configs[0], *clients]:
            if " keys " in name:  # the steady state: its own traffic first, not counted
                warm_up(url, script, args, admin_url)
            stop = threading.Event()
            sampler = threading.Thread(target=max_key_sessions,
                                       args=(admin_url, stop, sessions[name]))
            sampler.start()
            before = stolen_seconds()
            started_logins = logins(admin_url)
            result = wrk(url, args.duration, script)
            result["logins_per_s"] = (logins(admin_url) - started_logins) / args.duration
            runs[name].append(result)
            stolen[name] += stolen_seconds() - before
            stop.set()
            sampler.join()
            print(label, name, runs[name][-1], flush=True)
    floors = runs[configs[0][0]]
    cpu_seconds = (os.cpu_count() or 1) * args.duration * args.runs
    return [(label, name, median_of(runs[name], floors) | {
        "max_sessions": float(max(sessions[name] or [0])),
        "steal_pct": 100 * stolen[name] / cpu_seconds}) for name, _, _ in configs]


def urlpath(url: str) -> str:
    return "/" + url.split("/", 3)[3]


def report(rows: list[tuple[str, str, dict[str, float]]], order: str,
           args: argparse.Namespace, pairs: list[tuple[str, str, list[float]]]) -> None:
    lines = ["# SQL API throughput against the floor", "",
             *(f"- {k}: {v}" for k, v in machine().items()),
             f"- wrk -t2 -c64 -d{args.duration}s, {args.runs} rounds; req/s and p99 are medians "
             "of the rounds, the ratios medians of each round's ratio to that round's floor; "
             f"both servers --workers {args.workers}, grantkey with its default settings; each "
             f"many-keys run follows {args.warmup} s runs of the same traffic (not counted) "
             "until logins fall under 2% of the requests (6 at most); "
             "key-role connection cap per worker "
             f"{'sized by serve' if args.cap is None else args.cap}; logins/s = sessions "
             "PostgreSQL started per second; steal = CPU time the host took during the runs", "",
             "| query | client | req/s | ratio to floor | p99 ms | p99 / floor | non-2xx | "
             "max key-role sessions | logins/s | steal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, name, r in rows:
        sessions = "—" if name.startswith("floor") else f"{r['max_sessions']:.0f}"
        lines.append(f"| {label} | {name} | {r['rps']:,.0f} | {r['rps_ratio']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['p99_ratio']:.2f} | "
                     f"{r['non2xx']:.0f} | {sessions} | {r['logins_per_s']:,.0f} | "
                     f"{r['steal_pct']:.0f}% |")
    if not order:
        write_result("throughput-key-features", lines + paired_lines(pairs, args))
        return
    lines += ["", "Order check, a fresh server (10 rows, 1 run each, req/s): round-robin on an "
              "empty pool (cold), after warm-up (fresh), then Zipf after warm-up, then round-robin "
              "straight after it (after); "
              "the last column: after / fresh.", "",
              "| query | cold | logins/s | fresh | logins/s | Zipf | after | logins/s | "
              "after / fresh |", "|---|---|---|---|---|---|---|---|---|", order]
    name = "throughput" if args.cap is None else f"throughput-cap{args.cap}"
    write_result(name if args.workers == 2 else f"{name}-workers{args.workers}", lines)


def paired_lines(pairs: list[tuple[str, str, list[float]]], args: argparse.Namespace) -> list[str]:
    """The paired comparisons' table: each one's median ratio and quartiles."""
    lines = ["", f"Paired, req/s ratio (issue 15's target: guarded key / regular key >= 0.95): "
             f"{args.quads} quads of {args.quad_duration} s runs back to back (regular, other, "
             "other, regular), each quad's ratio (o1 + o2) / (r1 + r2); the control's spread "
             "is the method's noise", "",
             "| query | comparison | median ratio | quartiles | lowest | highest |",
             "|---|---|---|---|---|---|"]
    for label, name, ratios in pairs:
        low, _, high = (statistics.quantiles(ratios, n=4) if len(ratios) > 1
                        else (ratios[0],) * 3)
        lines.append(f"| {label} | {name} | {statistics.median(ratios):.3f} | "
                     f"{low:.3f}–{high:.3f} | {min(ratios):.3f} | {max(ratios):.3f} |")
    return lines


if __name__ == "__main__":
    main()
