"""The attacks hold on Debian's PostgreSQL 15 too (the default where PostGIS is installed),
not only on the embedded PostgreSQL 18: the security suite runs again, in a subprocess,
against a private PostgreSQL 15 cluster. PostgreSQL 16+ can grant a membership without
SET; 15 cannot, so on 15 a key can SET ROLE to its privilege roles and the reader role:
the guard refuses every DDL after SET ROLE, which these tests check on both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grantkey.cli.embedded import EmbeddedPostgres

SYSTEM_BIN = Path("/usr/lib/postgresql/15/bin")
ROOT = Path(__file__).resolve().parents[2]
ON_15 = [
    "tests/security/test_admin_runs_no_tenant_code.py",
    "tests/security/test_revocation_attacks.py",
    "tests/security/test_key_code_guard.py",
    "tests/security/test_tampered_key_roles.py",
    "tests/security/test_sessions_stay_private.py",
    "tests/security/test_names_cannot_spoof.py",
    "tests/security/test_storage_quota.py",
    "tests/security/test_storage_quota_withheld.py",
    "tests/security/test_storage_quota_attacks.py",
    "tests/security/test_storage_quota_attacks2.py",
    "tests/security/test_key_roles.py",
    "tests/security/test_sql_escapes.py",
    "tests/security/test_revocation.py",
    "tests/api/test_sql_copy_refused.py",
    "tests/api/test_datasets_inheritance.py",
]


@pytest.mark.slow
def test_the_security_suite_passes_on_postgresql_15(data_dir: Path) -> None:
    if os.environ.get("GRANTKEY_TEST_DATABASE_URL"):
        pytest.skip("already running against an external PostgreSQL")
    if not (SYSTEM_BIN / "initdb").exists():
        reason = "PostgreSQL 15 is not installed (apt-get install postgresql-15)"
        if os.environ.get("GRANTKEY_REQUIRE_POSTGIS") == "1":  # CI installs it
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = EmbeddedPostgres(data_dir / "security15", bin_dir=SYSTEM_BIN)
    cluster.start()
    try:
        env = {**os.environ, "GRANTKEY_TEST_DATABASE_URL": cluster.superuser_url}
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ON_15],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)
    finally:
        cluster.stop()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
