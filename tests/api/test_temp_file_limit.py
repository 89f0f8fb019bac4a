"""Temporary files are bounded (GRANTKEY_TEMP_FILE_LIMIT, applied to the embedded cluster
with ALTER SYSTEM), and no client can lift the bound: temp_file_limit is superuser-only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from grantkey.cli.embedded import EmbeddedPostgres
from tests.support import ServerProcess

# each test starts its own server or cluster: out of the inner loop
pytestmark = pytest.mark.slow


def test_temporary_files_are_bounded_and_clients_cannot_lift_the_bound(data_dir: Path) -> None:
    home = data_dir / "tempfiles"
    env = {k: "" for k in os.environ if k.startswith("GRANTKEY_")}
    env["GRANTKEY_TEMP_FILE_LIMIT"] = "2MB"
    server = ServerProcess(["--data-dir", str(home)], data_dir / "tempfiles.log", env)
    try:
        server.wait_healthy(timeout=90)
        created = subprocess.run(
            [sys.executable, "-m", "grantkey.cli", "users", "create", "temp", "--json",
             "--data-dir", str(home)], capture_output=True, text=True, timeout=120,
            env={**os.environ, **env}, check=True)
        master = json.loads(created.stdout)["master_token"]
        sql = f"{server.url}/user/temp/api/v2/sql"

        def run(q: str, token: str | None = master) -> httpx.Response:
            params = {"q": q} if token is None else {"q": q, "api_key": token}
            return httpx.get(sql, params=params, timeout=60)

        big = ("SET work_mem = '64kB'; SELECT count(*) AS n FROM (SELECT g, md5(g::text) "
               "FROM generate_series(1, 300000) g ORDER BY 2) s")
        refused = run(big)
        assert refused.status_code == 400
        assert "temp_file_limit" in refused.json()["error"][0]
        for token in (master, None):
            lifted = run("SET temp_file_limit = -1", token)
            assert lifted.status_code == 403, lifted.text
            assert "permission denied to set parameter" in lifted.json()["error"][0]
        small = run("SELECT count(*) AS n FROM generate_series(1, 1000)")
        assert small.json()["rows"] == [{"n": 1000}]
    finally:
        server.stop()
        EmbeddedPostgres(home).stop()
