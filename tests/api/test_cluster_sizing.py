"""The embedded cluster is sized from the machine (max_connections, shared_buffers), as
settings; the key-role connection cap defaults to what the cluster can hold, split across
the workers, and the server says so at start."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from grantkey.cli.embedded import EmbeddedPostgres, sizing
from grantkey.errors import SetupError
from grantkey.settings import Settings, sql_connections_per_worker
from tests.support import ServerProcess

GIB = 2**30


@pytest.mark.parametrize(("memory", "connections", "buffers"), [
    (24 * GIB, "3600", "3072MB"), (2 * GIB, "300", "256MB"), (512 * GIB, "4000", "8192MB"),
    (512 * 2**20, "100", "128MB"),
])
def test_the_cluster_is_sized_from_the_machines_memory(
    memory: int, connections: str, buffers: str,
) -> None:
    assert sizing(memory=memory) == {"max_connections": connections, "shared_buffers": buffers}
    assert sizing(300, "1GB", memory=memory) == {"max_connections": "300",
                                                 "shared_buffers": "1GB"}


def test_the_key_role_cap_is_what_the_cluster_holds_split_across_workers() -> None:
    """What is left once every worker's admin connections (140 at most) are counted."""
    assert sql_connections_per_worker(960, 1) == 810
    assert sql_connections_per_worker(960, 2) == 335
    assert sql_connections_per_worker(400, 2) == 55
    assert sql_connections_per_worker(20, 4) == 1


def test_the_key_role_cap_leaves_room_under_the_open_files_limit() -> None:
    """A worker holds a socket per key session: with Debian's usual soft limit of 1,024
    and no higher hard limit, the cap leaves room for clients (1,024 files)."""
    assert sql_connections_per_worker(2400, 2, open_files=1024) == 1
    assert sql_connections_per_worker(2400, 2, open_files=2048) == 1024
    assert sql_connections_per_worker(2400, 2, open_files=1_048_576) == 1055


def test_serve_lifts_the_soft_open_files_limit_to_the_hard_one() -> None:
    script = ("import resource; soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
              "from grantkey.cli.serve import raise_open_files_limit; "
              "print(raise_open_files_limit(), hard, resource.getrlimit("
              "resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.split()
    now, hard, soft = (int(x) for x in out)
    assert now == soft == (hard if hard != resource.RLIM_INFINITY else 1_048_576)


@pytest.mark.parametrize(("name", "value"), [("GRANTKEY_PG_MAX_CONNECTIONS", "5"),
                                             ("GRANTKEY_PG_SHARED_BUFFERS", "lots"),
                                             ("GRANTKEY_PG_SHARED_BUFFERS", "-1")])
def test_bad_sizes_stop_the_start(name: str, value: str) -> None:
    with pytest.raises(SetupError, match=name):
        Settings.from_env({name: value})


@pytest.mark.slow  # starts its own server
def test_serve_applies_the_sizes_and_splits_the_cap_across_workers(tmp_path: Path) -> None:
    if os.environ.get("GRANTKEY_TEST_DATABASE_URL"):
        pytest.skip("sizes grantkey's own embedded PostgreSQL")
    home = tmp_path / "sized"
    env = {k: "" for k in os.environ if k.startswith("GRANTKEY_")}
    env.update(GRANTKEY_PG_MAX_CONNECTIONS="400", GRANTKEY_PG_SHARED_BUFFERS="256MB")
    server = ServerProcess(["--data-dir", str(home), "--workers", "2"], tmp_path / "sized.log",
                           env)
    try:
        server.wait_healthy(timeout=90)
        with psycopg.connect(EmbeddedPostgres(home).admin_url) as conn:
            shown = [conn.execute(f"SHOW {name}").fetchone()
                     for name in ("max_connections", "shared_buffers")]
        assert shown == [("400",), ("256MB",)]
    finally:
        server.stop()
    assert ("PostgreSQL max_connections 400: up to 55 key-role connections per worker "
            "(2 worker(s))") in server.log_path.read_text()
