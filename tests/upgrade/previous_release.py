"""Fixture builder: a data directory made by the previous release of grantkey.

The previous release's source is taken from git history (`git archive`), and its own CLI
runs with that source first on PYTHONPATH (the dependencies are the same), on the embedded
PostgreSQL. It makes a user with a table and a regular key (with schema create), the
objects an upgrade must carry over. Run it by hand to keep a data directory for study (the newest release
unless a commit is named):

    .venv/bin/python -m tests.upgrade.previous_release /tmp/old-data [COMMIT]
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import psycopg

from grantkey.cli.embedded import EmbeddedPostgres

# main before numbered migrations existed (2026-11-23)
BEFORE_MIGRATIONS = "d92998a40c0a480d56acd33e15addc7804db77ef"
# main before the routine admin (2026-11-30): every user database made by the superuser,
# at user migration 5
BEFORE_ROUTINE_ADMIN = "5d80e41fe7ff1d3e491a29185aba402a42c65e36"
# main before the quota withheld CREATE over its limit (2026-12-01): at user migration 6
BEFORE_CREATE_WITHHELD = "1732c378528a5af2506315f9b9ba73ad24fb73f4"
PREVIOUS_RELEASES = [BEFORE_MIGRATIONS, BEFORE_ROUTINE_ADMIN, BEFORE_CREATE_WITHHELD]
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class OldInstallation:
    data_dir: Path
    username: str
    master_token: str
    key_token: str


def release_available(release: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{release}^{{commit}}"], cwd=ROOT,
                          capture_output=True, check=False).returncode == 0


def extract_source(release: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", "--format=tar", release, "src"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def old_cli(source: Path, data_dir: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRANTKEY_")}
    env["PYTHONPATH"] = str(source)
    result = subprocess.run([sys.executable, "-m", "grantkey.cli", *args, "--data-dir",
                             str(data_dir)], capture_output=True, text=True, env=env,
                            timeout=180, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"previous release's CLI failed: {args}: {result.stderr}")
    return result.stdout


def build(release: str, data_dir: Path, work: Path) -> OldInstallation:
    source = extract_source(release, work)
    probe = subprocess.run([sys.executable, "-c", "import grantkey; print(grantkey.__file__)"],
                           env={**os.environ, "PYTHONPATH": str(source)}, capture_output=True,
                           text=True, check=True).stdout
    assert probe.startswith(str(source)), f"the old source is not the one imported: {probe}"
    # the old release makes its cluster (later CLIs refuse a directory `serve` never made)
    subprocess.run([sys.executable, "-c", "import sys, pathlib; from grantkey.cli.embedded "
                    "import EmbeddedPostgres; EmbeddedPostgres(pathlib.Path(sys.argv[1]))"
                    ".initialise()", str(data_dir)],
                   env={**os.environ, "PYTHONPATH": str(source)}, check=True, timeout=180)
    created = json.loads(old_cli(source, data_dir, "users", "create", "olduser", "--json"))
    cluster = EmbeddedPostgres(data_dir)
    cluster.start()
    try:
        with psycopg.connect(cluster.superuser_url, dbname=created["database"],
                             autocommit=True) as conn:
            conn.execute(f'SET ROLE "{_owner(conn)}"')
            conn.execute("CREATE TABLE cities (name text); INSERT INTO cities VALUES ('Lima')")
    finally:
        cluster.stop()
    key = json.loads(old_cli(source, data_dir, "keys", "create", "olduser", "maker", "--api", "sql",
                             "--table", "public.cities:select", "--schema-create", "public",
                             "--json"))
    return OldInstallation(data_dir, "olduser", created["master_token"], key["token"])


def _owner(conn: psycopg.Connection[tuple[object, ...]]) -> str:
    row = conn.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace "
                       "WHERE nspname = 'public'").fetchone()
    assert row is not None
    return str(row[0])


if __name__ == "__main__":
    target = Path(sys.argv[1])
    release = sys.argv[2] if len(sys.argv) > 2 else PREVIOUS_RELEASES[-1]
    made = build(release, target, target.parent / (target.name + "-source"))
    print(made)
