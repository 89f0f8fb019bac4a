"""Session-wide fixtures: one real PostgreSQL and one real grantkey server for the suite.

PostgreSQL is the embedded one (started once), or GRANTKEY_TEST_DATABASE_URL. The server
is `grantkey serve --workers 2` in a subprocess, on 127.0.0.1. A test (or module) marked
`in_process` talks to the same app in this process instead (tests/in_process.py): its
`account` URLs and its `http` client reach that app, and the subprocess server is started
only if the test asks for it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
import httpx._transports.default as httpx_transports
import psycopg
import psycopg.sql
import pytest

from grantkey.cli.embedded import ROUTINE_ROLE, EmbeddedPostgres, sizing
from grantkey.db.bootstrap import bootstrap
from grantkey.domain.keys import User
from grantkey.domain.secrets_box import SecretBox
from grantkey.services.container import Services
from grantkey.services.rate_store import table_path
from grantkey.services.upgrade import prepare_routine_admin
from grantkey.settings import Settings
from tests.in_process import IN_PROCESS_URL, InProcessApp
from tests.in_process import client as in_process_client
from tests.support import TEST_SECRET, ServerProcess, suite_binaries

T = TypeVar("T")
ON_OTHER_TEST = ("tests/security/test_on_the_other_postgresql.py::"
                 "test_the_security_suite_passes_on_the_other_postgresql")


def pytest_collection_finish(session: pytest.Session) -> None:
    """The security suite's second run, on the other PostgreSQL, is most of ten minutes of waiting:
    when this session will run that test, its run starts now, alongside the rest."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # every worker collects every test: the test starts the run where it lands
    if not any(item.nodeid == ON_OTHER_TEST for item in session.items):
        return
    from tests.security.test_on_the_other_postgresql import RUN_ON_OTHER, RunOnOther, skip_reason

    if skip_reason() is None:
        run = RunOnOther()
        session.config.stash[RUN_ON_OTHER] = run
        run.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    from tests.security.test_on_the_other_postgresql import RUN_ON_OTHER

    run = config.stash.get(RUN_ON_OTHER, None)
    if run is not None:
        run.abandon()
SQL_TIMEOUT = 3
Runner = Callable[[Awaitable[T]], T]


@pytest.fixture(scope="session", autouse=True)
def one_tls_context() -> Iterator[None]:
    """Every httpx client loads the CA bundle into a new TLS context (50-80 ms here, some
    thousand clients in the suite), although the tests speak plain HTTP to 127.0.0.1: one
    context, made once, serves them all. Fails loudly if httpx moves the function."""
    context = httpx.create_ssl_context()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(httpx_transports, "create_ssl_context", lambda *args, **kwargs: context)
        yield


def scratch_root() -> str | None:
    """Where the tests' clusters and files go: memory (/dev/shm) when it has room, else the
    system's temporary directory. The suite creates and drops thousands of files (each
    database, each temporary table); on ext4 creating a file after many deletions walks
    the recently deleted inodes (`recently_deleted` was half of all CPU time at -n 4)."""
    shm = "/dev/shm"
    try:
        room = os.statvfs(shm)
    except OSError:
        return None
    enough = room.f_bavail * room.f_frsize >= 4 * 2**30
    runnable = not room.f_flag & os.ST_NOEXEC  # some tests run programs they write there
    return shm if enough and runnable and os.access(shm, os.W_OK | os.X_OK) else None


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A directory of the test's own, outside /tmp/pytest-of-USER: the PostgreSQL clusters
    some tests start there run as another OS account, which must traverse its parents, and
    each pytest session that starts on the machine takes the rights of group and others off
    pytest-of-USER (_pytest/tmpdir.py): a cluster of a test running then failed its initdb
    with 'Permission denied'."""
    path = Path(tempfile.mkdtemp(prefix="gktmp-", dir=scratch_root()))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gkt-", dir=scratch_root()))
    yield path
    shutil.rmtree(path, ignore_errors=True)
    table_path(path).unlink(missing_ok=True)  # the servers' rate-limit buckets


@pytest.fixture(scope="session")
def admin_url(data_dir: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    external = os.environ.get("GRANTKEY_TEST_DATABASE_URL")
    # sized for a test session, not for the machine (150 connections per GiB, an eighth of
    # RAM in buffers: made for one cluster per machine, and `-n 4` starts four): 1,000
    # connections still leave the subprocess server 355 key-role connections per worker
    # the binaries a new `grantkey serve` data directory gets (a PostgreSQL with PostGIS
    # when the machine has one: the Maps API and GeoJSON tests need it), or the second
    # run's (tests/security/test_on_the_other_postgresql.py)
    embedded = None if external else EmbeddedPostgres(data_dir / "cluster", bin_dir=suite_binaries(),
                                                      size=sizing(1000, "256MB"))
    if embedded is not None:
        embedded.start()
    # the tests inspect and set up as the superuser; grantkey itself runs as the routine
    # admin (`routine_url`), as `grantkey serve` does on its embedded cluster
    url = external or embedded.superuser_url
    try:
        yield url
        if not request.session.testsfailed:
            assert_nothing_left_behind(url)
    finally:
        if embedded is not None:
            embedded.stop()


def assert_nothing_left_behind(url: str) -> None:
    """The suite must leave no user databases or roles behind."""
    with psycopg.connect(url, autocommit=True) as conn:
        databases = conn.execute(
            "SELECT datname FROM pg_database WHERE datname ~ '^gk_[0-9a-f]{16}$'"
        ).fetchall()
        roles = conn.execute("SELECT rolname FROM pg_roles WHERE rolname ~ '^gk_'").fetchall()
    assert databases == [], f"databases left behind: {databases}"
    assert roles == [], f"roles left behind: {roles}"


@pytest.fixture(scope="session")
def routine_url(admin_url: str) -> str:
    """grantkey's own login: the embedded cluster's routine admin (not a superuser)."""
    if os.environ.get("GRANTKEY_TEST_DATABASE_URL"):
        return admin_url
    asyncio.run(prepare_routine_admin(admin_url, ROUTINE_ROLE))
    params = psycopg.conninfo.conninfo_to_dict(admin_url)
    params["user"] = ROUTINE_ROLE
    return psycopg.conninfo.make_conninfo("", **params)


@pytest.fixture(scope="session")
def settings(data_dir: Path, admin_url: str, routine_url: str) -> Settings:
    superuser = None if routine_url == admin_url else admin_url
    return Settings(data_dir=data_dir, database_url=routine_url, secret=TEST_SECRET,
                    superuser_url=superuser)


@dataclass(frozen=True)
class Login:
    """How a test's own `grantkey serve` logs in: as the session's server does (the routine
    admin, plus the superuser URL for what only a superuser can do)."""

    database_url: str
    env: dict[str, str]

    def args(self, data_dir: Path) -> list[str]:
        return ["--database-url", self.database_url, "--data-dir", str(data_dir)]


@pytest.fixture(scope="session")
def login(settings: Settings) -> Login:
    assert settings.database_url is not None
    return Login(settings.database_url,
                 {"GRANTKEY_SECRET": TEST_SECRET,
                  "GRANTKEY_SUPERUSER_URL": settings.superuser_url or ""})


@pytest.fixture(scope="session")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


@pytest.fixture(scope="session")
def run(loop: asyncio.AbstractEventLoop) -> Callable[[Awaitable[Any]], Any]:
    """Run a coroutine on the session's event loop (the in-process services live there)."""
    return loop.run_until_complete


@pytest.fixture(scope="session")
def services(settings: Settings, run: Callable[[Awaitable[Any]], Any]) -> Iterator[Services]:
    assert settings.database_url
    run(bootstrap(settings.database_url))
    instance = Services(settings, settings.database_url)
    run(instance.open(migrate=False))
    yield instance
    run(instance.close())


@pytest.fixture(scope="session")
def box() -> SecretBox:
    return SecretBox(TEST_SECRET.encode())


@pytest.fixture(scope="session")
def in_process_app(settings: Settings, services: Services) -> Iterator[InProcessApp]:
    # no job runner: one here would claim the jobs of tests that run them on a server of their
    # own (red CI at 06f29c0 and 1b0fefb: a job meant to wait ran here instead)
    app = InProcessApp(replace(settings, sql_timeout=SQL_TIMEOUT, sql_master_timeout=SQL_TIMEOUT,
                               job_runners=0, rate_limit_lookups="0"))
    app.start()
    try:
        yield app
    finally:
        app.stop()


def runs_in_process(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return (node.get_closest_marker("in_process") is not None
            and node.get_closest_marker("subprocess") is None)


@pytest.fixture
def base_url(request: pytest.FixtureRequest) -> str:
    """Where this test's accounts are served: the in-process app or the subprocess server."""
    if runs_in_process(request):
        request.getfixturevalue("in_process_app")
        return IN_PROCESS_URL
    server: ServerProcess = request.getfixturevalue("server")
    return server.url


@pytest.fixture(scope="session")
def server(data_dir: Path, settings: Settings, services: Services) -> Iterator[ServerProcess]:
    assert settings.database_url is not None
    process = ServerProcess(
        ["--database-url", settings.database_url, "--data-dir", str(data_dir), "--workers", "2"],
        data_dir / "server.log",
        {"GRANTKEY_SECRET": TEST_SECRET, "GRANTKEY_LOG_LEVEL": "debug",
         "GRANTKEY_SUPERUSER_URL": settings.superuser_url or "",
         # short limits, so the tests of time limits and pool waits run fast
         "GRANTKEY_SQL_TIMEOUT": str(SQL_TIMEOUT), "GRANTKEY_SQL_MASTER_TIMEOUT": str(SQL_TIMEOUT),
         # it runs no batch job: the tests that need runners start them (`job_runners`),
         # so that a crash test knows which server runs its job
         "GRANTKEY_JOB_RUNNERS": "0", "GRANTKEY_RATE_LIMIT_LOOKUPS": "0"},
    )
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def job_runners(data_dir: Path, login: Login) -> Iterator[ServerProcess]:
    """A server whose workers run batch jobs (the shared one runs none), for a module."""
    process = ServerProcess([*login.args(data_dir), "--workers", "2"],
                            data_dir / "job-runners.log",
                            {**login.env, "GRANTKEY_JOB_RUNNERS": "1"})
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


@dataclass
class Account:
    """A fresh user for one test: its name, master token and database."""

    user: User
    master_token: str
    base_url: str

    @property
    def username(self) -> str:
        return self.user.username

    @property
    def keys_url(self) -> str:
        return f"{self.base_url}/user/{self.username}/api/v3/api_keys"

    @property
    def sql_url(self) -> str:
        return f"{self.base_url}/user/{self.username}/api/v2/sql"

    def sql(self, http: httpx.Client, q: str, token: str | None = None,
            **params: Any) -> httpx.Response:
        """GET the SQL API; `token=None` sends no key (the default public key)."""
        query = {"q": q, **params}
        if token is not None:
            query["api_key"] = token
        return http.get(self.sql_url, params=query)

    def master(self) -> dict[str, str]:
        return {"api_key": self.master_token}


_counter = iter(range(10**9))


@pytest.fixture
def make_account(
    services: Services, run: Callable[[Awaitable[Any]], Any], base_url: str
) -> Iterator[Callable[[], Account]]:
    created: list[str] = []

    def make() -> Account:
        username = f"u{os.getpid()}-{next(_counter)}"
        result = run(services.users.create(username))
        created.append(username)
        return Account(result.user, result.master_token, base_url)

    yield make
    for username in created:
        run(services.users.delete(username))


@pytest.fixture(scope="session")
def postgis(services: Services, run: Callable[[Awaitable[Any]], Any]) -> None:
    """The suite's PostgreSQL has PostGIS (the Maps API and GeoJSON tests need it): else
    they skip, or fail where GRANTKEY_REQUIRE_POSTGIS=1 (CI, which installs it)."""
    if run(services.cluster.postgis_available()):
        return
    reason = ("this PostgreSQL has no PostGIS (Debian/Ubuntu: apt-get install "
              "postgresql-postgis; the suite then runs that PostgreSQL)")
    if os.environ.get("GRANTKEY_REQUIRE_POSTGIS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def account(make_account: Callable[[], Account]) -> Account:
    return make_account()


@pytest.fixture
def http(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    if runs_in_process(request):
        app: InProcessApp = request.getfixturevalue("in_process_app")
        with in_process_client(app, timeout=30) as client:
            yield client
    else:
        with httpx.Client(timeout=30) as client:
            yield client



@pytest.fixture
def owner_sql(admin_url: str) -> Callable[[Account, str], None]:
    """Run trusted setup SQL in a user's database as its owner role (what the master does)."""

    def execute(account: Account, statements: str) -> None:
        with psycopg.connect(admin_url, dbname=account.user.database, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("SET ROLE {}").format(
                psycopg.sql.Identifier(account.user.owner_role)))
            conn.execute(statements.encode())

    return execute


@dataclass
class KeyHandle:
    """A key created in-process, with what it takes to log in as its role."""

    name: str
    token: str
    role: str
    password: str
    conninfo: str

    def connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.conninfo, autocommit=True)


@pytest.fixture
def make_key(
    services: Services, run: Callable[[Awaitable[Any]], Any], box: SecretBox
) -> Callable[[Account, str, Any], KeyHandle]:
    def make(account: Account, name: str, grants: Any) -> KeyHandle:
        master = run(services.keys.master_principal(account.user))
        view = run(services.keys.create(master, name, grants))
        handle = builtin_handle(services, box, account, view.record.role, view.token)
        handle.name = name
        return handle

    return make


def builtin_handle(services: Services, box: SecretBox, account: Account, role: str,
                   token: str) -> KeyHandle:
    password = box.role_password(role, token)
    conninfo = services.cluster.role_conninfo(account.user.database, role, password)
    return KeyHandle(role, token, role, password, conninfo)
