"""The attacks hold on Debian's PostgreSQL 15 too (the default where PostGIS is installed),
not only on the embedded PostgreSQL 18: the security suite runs again, in a subprocess,
against a private PostgreSQL 15 cluster. PostgreSQL 16+ can grant a membership without
SET; 15 cannot, so on 15 a key can SET ROLE to its privilege roles and the reader role:
the guard refuses every DDL after SET ROLE, which these tests check on both.

That second run is most of ten minutes of waiting on servers and PostgreSQL: it starts as
soon as the session has collected this test (tests/conftest.py), alongside the rest of the
suite, and this test waits for its verdict."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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
TIMEOUT = 1800


class RunOn15(threading.Thread):
    """The security suite on a private PostgreSQL 15 cluster, in a subprocess, from a
    thread: `verdict()` waits for it. Started at most once per session."""

    def __init__(self) -> None:
        super().__init__(name="security-suite-on-15", daemon=True)
        self.result: subprocess.CompletedProcess[str] | None = None
        self.error: BaseException | None = None
        self._process: subprocess.Popen[str] | None = None

    def run(self) -> None:
        home = Path(tempfile.mkdtemp(prefix="gk15-"))
        try:
            cluster = EmbeddedPostgres(home / "security15", bin_dir=SYSTEM_BIN)
            cluster.start()
            try:
                env = {**os.environ, "GRANTKEY_TEST_DATABASE_URL": cluster.superuser_url}
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ON_15],
                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                out, err = self._process.communicate(timeout=TIMEOUT)
                self.result = subprocess.CompletedProcess(self._process.args,
                                                          self._process.returncode, out, err)
            finally:
                cluster.stop()
        except BaseException as error:
            self.error = error
        finally:
            shutil.rmtree(home, ignore_errors=True)

    def verdict(self) -> subprocess.CompletedProcess[str]:
        self.join(TIMEOUT + 120)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "the run on PostgreSQL 15 did not end"
        return self.result

    def abandon(self) -> None:
        """The session ends without waiting for it (interrupted, or the test failed early)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)  # its fixtures stop its servers
        self.join(120)


def skip_reason() -> str | None:
    if os.environ.get("GRANTKEY_TEST_DATABASE_URL"):
        return "already running against an external PostgreSQL"
    if not (SYSTEM_BIN / "initdb").exists():
        return "PostgreSQL 15 is not installed (apt-get install postgresql-15)"
    return None


@pytest.mark.slow
def test_the_security_suite_passes_on_postgresql_15(request: pytest.FixtureRequest) -> None:
    reason = skip_reason()
    if reason is not None:
        if os.environ.get("GRANTKEY_REQUIRE_POSTGIS") == "1" and "not installed" in reason:
            pytest.fail(reason)  # CI installs it
        pytest.skip(reason)
    run: RunOn15 | None = request.config.stash.get(RUN_ON_15, None)
    if run is None:  # not started at collection (e.g. a plugin reordered the session)
        run = RunOn15()
        request.config.stash[RUN_ON_15] = run
        run.start()
    result = run.verdict()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


RUN_ON_15 = pytest.StashKey[RunOn15]()
