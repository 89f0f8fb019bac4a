"""One settings object, read once from GRANTKEY_* variables and command-line flags."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from grantkey.errors import SetupError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise SetupError(f"{name} must be true or false, not {raw!r}")


def _env_int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SetupError(f"{name} must be a whole number, not {raw!r}") from None
    if value < minimum:
        raise SetupError(f"{name} must be at least {minimum}, not {value}")
    return value


_SIZE = re.compile(r"-1|[0-9]{1,12}(kB|MB|GB|TB)?")


def _env_size(env: Mapping[str, str], name: str, default: str) -> str:
    """A PostgreSQL size: digits with an optional kB, MB, GB or TB unit, or -1 (no limit)."""
    value = (env.get(name) or default).strip()
    if not _SIZE.fullmatch(value):
        raise SetupError(f"{name} must be a size such as 500MB, 2GB or -1 (no limit), "
                         f"not {value[:40]!r}")
    return value


def _env_optional_int(env: Mapping[str, str], name: str, minimum: int = 1) -> int | None:
    """A whole number, or None when unset (then sized automatically)."""
    if not env.get(name):
        return None
    return _env_int(env, name, 0, minimum=minimum)


def _env_optional_size(env: Mapping[str, str], name: str) -> str | None:
    if not env.get(name):
        return None
    value = _env_size(env, name, "")
    if value == "-1":
        raise SetupError(f"{name} must be a size such as 2GB, not -1")
    return value


def _env_share(env: Mapping[str, str], name: str, default: float) -> float:
    """A share of the connections: more than 0, at most 1."""
    value = _float_or_none(env, name, "a fraction such as 0.5")
    if value is None:
        return default
    if not 0 < value <= 1:
        raise SetupError(f"{name} must be more than 0 and at most 1, not {env[name]}")
    return value


def _env_quota(env: Mapping[str, str], name: str) -> str:
    """A size more than 0, or -1 (none, the default)."""
    value = _env_size(env, name, "-1")
    if re.fullmatch(r"0+(kB|MB|GB|TB)?", value):
        raise SetupError(f"{name} must be more than 0, or -1 for no quota, not {value!r}")
    return value


def _float_or_none(env: Mapping[str, str], name: str, what: str) -> float | None:
    """The variable as a number, None when unset; `what` says what it should look like."""
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise SetupError(f"{name} must be {what}, not {raw[:40]!r}") from None


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float_or_none(env, name, "a number of seconds")
    if value is None:
        return default
    if not value > 0:
        raise SetupError(f"{name} must be more than 0, not {env[name]}")
    return value


@dataclass(frozen=True)
class Settings:
    """Every setting grantkey reads. See docs/settings.md."""

    data_dir: Path = Path("grantkey-data")
    database_url: str | None = None
    secret: str | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    store_tokens: bool = True
    max_keys_per_user: int = 0
    key_cache_size: int = 10_000
    max_body_bytes: int = 1_048_576
    max_query_bytes: int = 262_144
    log_level: str = "info"
    sql_timeout: float = 25.0
    sql_master_timeout: float = 25.0
    sql_max_connections: int | None = None  # None: sized by `serve` from the cluster
    sql_pool_wait: float = 5.0
    sql_idle_seconds: float = 60.0
    send_timeout: float = 30.0
    sql_key_share: float = 0.5
    pg_max_connections: int | None = None  # embedded cluster; None: sized from the machine
    pg_shared_buffers: str | None = None  # embedded cluster; None: sized from the machine
    sql_user_share: float = 0.75
    temp_file_limit: str = "1GB"
    storage_quota: str = "-1"  # per user database; -1: none
    max_header_bytes: int = 65_536
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    shutdown_seconds: float = 10.0
    # only for the processes that need it (serve's start, the CLI); never given to workers
    superuser_url: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        settings = cls(
            data_dir=Path(env.get("GRANTKEY_DATA_DIR") or "grantkey-data"),
            database_url=env.get("GRANTKEY_DATABASE_URL") or None,
            secret=env.get("GRANTKEY_SECRET") or None,
            host=env.get("GRANTKEY_HOST") or "127.0.0.1",
            port=_env_int(env, "GRANTKEY_PORT", 8000, minimum=0),
            workers=_env_int(env, "GRANTKEY_WORKERS", 1, minimum=1),
            store_tokens=_env_bool(env, "GRANTKEY_STORE_TOKENS", True),
            max_keys_per_user=_env_int(env, "GRANTKEY_MAX_KEYS_PER_USER", 0),
            key_cache_size=_env_int(env, "GRANTKEY_KEY_CACHE_SIZE", 10_000),
            max_body_bytes=_env_int(env, "GRANTKEY_MAX_BODY_BYTES", 1_048_576, minimum=1024),
            max_query_bytes=_env_int(env, "GRANTKEY_MAX_QUERY_BYTES", 262_144, minimum=1024),
            log_level=env.get("GRANTKEY_LOG_LEVEL") or "info",
            sql_timeout=_env_float(env, "GRANTKEY_SQL_TIMEOUT", 25.0),
            sql_master_timeout=_env_float(env, "GRANTKEY_SQL_MASTER_TIMEOUT", 25.0),
            sql_max_connections=_env_optional_int(env, "GRANTKEY_SQL_MAX_CONNECTIONS"),
            pg_max_connections=_env_optional_int(env, "GRANTKEY_PG_MAX_CONNECTIONS",
                                                 minimum=20),
            pg_shared_buffers=_env_optional_size(env, "GRANTKEY_PG_SHARED_BUFFERS"),
            sql_pool_wait=_env_float(env, "GRANTKEY_SQL_POOL_WAIT", 5.0),
            sql_idle_seconds=_env_float(env, "GRANTKEY_SQL_IDLE_SECONDS", 60.0),
            send_timeout=_env_float(env, "GRANTKEY_SEND_TIMEOUT", 30.0),
            sql_key_share=_env_share(env, "GRANTKEY_SQL_KEY_SHARE", 0.5),
            sql_user_share=_env_share(env, "GRANTKEY_SQL_USER_SHARE", 0.75),
            temp_file_limit=_env_size(env, "GRANTKEY_TEMP_FILE_LIMIT", "1GB"),
            storage_quota=_env_quota(env, "GRANTKEY_STORAGE_QUOTA"),
            max_header_bytes=_env_int(env, "GRANTKEY_MAX_HEADER_BYTES", 65_536, minimum=1024),
            header_timeout=_env_float(env, "GRANTKEY_HEADER_TIMEOUT", 10.0),
            body_timeout=_env_float(env, "GRANTKEY_BODY_TIMEOUT", 30.0),
            shutdown_seconds=_env_float(env, "GRANTKEY_SHUTDOWN_SECONDS", 10.0),
            superuser_url=env.get("GRANTKEY_SUPERUSER_URL") or None,
        )
        given = {name: value for name, value in overrides.items() if value is not None}
        return replace(settings, **given)

    def as_env(self) -> dict[str, str]:
        """The variables that make `from_env` rebuild these settings in a worker process."""
        env = {
            "GRANTKEY_DATA_DIR": str(self.data_dir),
            "GRANTKEY_HOST": self.host,
            "GRANTKEY_PORT": str(self.port),
            "GRANTKEY_WORKERS": str(self.workers),
            "GRANTKEY_STORE_TOKENS": "true" if self.store_tokens else "false",
            "GRANTKEY_MAX_KEYS_PER_USER": str(self.max_keys_per_user),
            "GRANTKEY_KEY_CACHE_SIZE": str(self.key_cache_size),
            "GRANTKEY_MAX_BODY_BYTES": str(self.max_body_bytes),
            "GRANTKEY_MAX_QUERY_BYTES": str(self.max_query_bytes),
            "GRANTKEY_LOG_LEVEL": self.log_level,
            "GRANTKEY_SQL_TIMEOUT": str(self.sql_timeout),
            "GRANTKEY_SQL_MASTER_TIMEOUT": str(self.sql_master_timeout),
            "GRANTKEY_SQL_POOL_WAIT": str(self.sql_pool_wait),
            "GRANTKEY_SQL_IDLE_SECONDS": str(self.sql_idle_seconds),
            "GRANTKEY_SEND_TIMEOUT": str(self.send_timeout),
            "GRANTKEY_SQL_KEY_SHARE": str(self.sql_key_share),
            "GRANTKEY_SQL_USER_SHARE": str(self.sql_user_share),
            "GRANTKEY_TEMP_FILE_LIMIT": self.temp_file_limit,
            "GRANTKEY_STORAGE_QUOTA": self.storage_quota,
            "GRANTKEY_MAX_HEADER_BYTES": str(self.max_header_bytes),
            "GRANTKEY_HEADER_TIMEOUT": str(self.header_timeout),
            "GRANTKEY_BODY_TIMEOUT": str(self.body_timeout),
            "GRANTKEY_SHUTDOWN_SECONDS": str(self.shutdown_seconds),
        }
        if self.sql_max_connections is not None:
            env["GRANTKEY_SQL_MAX_CONNECTIONS"] = str(self.sql_max_connections)
        if self.database_url:
            env["GRANTKEY_DATABASE_URL"] = self.database_url
        if self.secret:
            env["GRANTKEY_SECRET"] = self.secret
        return env


DEFAULT_SQL_MAX_CONNECTIONS = 100  # in-process services (tests, CLI) not sized by `serve`
FILES_RESERVE = 1024  # a worker's HTTP clients, admin connections and files
ADMIN_RESERVE = 10  # PostgreSQL's reserved and grantkey's own start-up connections
# each process's admin connections at most: the metadata pool (8), 32 user-database pools
# of 4, the LISTEN, watch and revocation-cleanup connections
ADMIN_PER_WORKER = 8 + 32 * 4 + 4


def sql_connections_per_worker(cluster_max: int, workers: int,
                               open_files: int | None = None) -> int:
    """What the cluster can hold for key roles, split across the workers; no more than a
    process's open-file limit leaves once its clients and admin connections are counted."""
    share = (cluster_max - ADMIN_RESERVE - ADMIN_PER_WORKER * workers) // workers
    if open_files is not None:
        share = min(share, open_files - FILES_RESERVE)
    return max(1, share)
