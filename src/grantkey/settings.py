"""One settings object, read once from GRANTKEY_* variables and command-line flags.

Every setting is one row of one table, the fields of `Settings`: its name, environment
variable, default, parser and help (and its command-line flag, if it has one). The same
rows drive `Settings.from_env`, `Settings.as_env` (what `serve` hands its workers), the
CLI's options (`cli/common.setting_options`) and the test that docs/settings.md documents
each of them (`tests/unit/test_settings_documented.py`). `SETTINGS` lists them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from grantkey.errors import SetupError
from grantkey.rate_text import rate_parts

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SIZE = re.compile(r"-1|[0-9]{1,12}(kB|MB|GB|TB)?")


@dataclass(frozen=True)
class Parser:
    """Reads a setting's text: its value, or ValueError saying what it must be (the
    message follows the setting's name: `GRANTKEY_PORT must be a whole number, not 'x'`)."""

    metavar: str  # what the CLI's --help shows: TEXT, INTEGER, ...
    read: Callable[[str], Any]


def _text(raw: str) -> str:
    return raw


def _directory(raw: str) -> Path:
    path = Path(raw)
    if path.exists() and not path.is_dir():
        raise ValueError(f"must be a directory, not the file {raw[:80]!r}")
    return path


def _boolean(raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ValueError(f"must be true or false, not {raw!r}")


def whole(minimum: int = 0) -> Parser:
    def read(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"must be a whole number, not {raw!r}") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, not {value}")
        return value

    return Parser("INTEGER", read)


def _number(raw: str, what: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"must be {what}, not {raw[:40]!r}") from None


def _seconds(raw: str) -> float:
    value = _number(raw, "a number of seconds")
    if not value > 0:
        raise ValueError(f"must be more than 0, not {raw}")
    return value


def _share(raw: str) -> float:
    """A share of the connections: more than 0, at most 1."""
    value = _number(raw, "a fraction such as 0.5")
    if not 0 < value <= 1:
        raise ValueError(f"must be more than 0 and at most 1, not {raw}")
    return value


def _size(raw: str) -> str:
    """A PostgreSQL size: digits with an optional kB, MB, GB or TB unit, or -1 (no limit)."""
    value = raw.strip()
    if not _SIZE.fullmatch(value):
        raise ValueError(f"must be a size such as 500MB, 2GB or -1 (no limit), "
                         f"not {value[:40]!r}")
    return value


def _limited_size(raw: str) -> str:
    """A size, not -1."""
    value = _size(raw)
    if value == "-1":
        raise ValueError("must be a size such as 2GB, not -1")
    return value


def _quota(raw: str) -> str:
    """A size more than 0, or -1 (none)."""
    value = _size(raw)
    if re.fullmatch(r"0+(kB|MB|GB|TB)?", value):
        raise ValueError(f"must be more than 0, or -1 for no quota, not {value!r}")
    return value


def _rate(raw: str) -> str:
    """A rate limit as text, checked: `REQUESTS/SECONDS[/BURST]`, or 0 for none."""
    rate_parts(raw)
    return raw.strip() or "0"


def _proxies(raw: str) -> str:
    """Addresses or CIDR networks, comma-separated."""
    entries = [item.strip() for item in raw.split(",") if item.strip()]
    for item in entries:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"must be IP addresses or CIDR networks separated by commas, "
                             f"not {item[:40]!r}") from None
    return ",".join(entries)


TEXT = Parser("TEXT", _text)
PROXIES = Parser("ADDRESSES", _proxies)
RATE = Parser("RATE", _rate)
DIRECTORY = Parser("DIRECTORY", _directory)
BOOLEAN = Parser("BOOLEAN", _boolean)
SECONDS = Parser("SECONDS", _seconds)
SHARE = Parser("FRACTION", _share)
SIZE = Parser("SIZE", _size)
LIMITED_SIZE = Parser("SIZE", _limited_size)
QUOTA = Parser("SIZE", _quota)


@dataclass(frozen=True)
class Setting:
    """One row of the settings table."""

    name: str  # the field of Settings
    env: str  # GRANTKEY_…
    default: Any  # None: unset (sized, embedded, …: docs/settings.md says what then)
    parser: Parser
    help: str  # one sentence; docs/settings.md's meaning of the setting starts with it
    flag: str | None = None  # the command-line option, if the CLI has one
    for_workers: bool = True  # does `serve` pass it to its worker processes?

    def parse(self, raw: str) -> Any:
        """The value of the variable's text; SetupError naming the variable if it is bad."""
        try:
            return self.parser.read(raw)
        except ValueError as error:
            raise SetupError(f"{self.env} {error}") from None

    def text(self, value: Any) -> str:
        """A value as the variable's text, which `parse` reads back as the same value."""
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    @property
    def shown_default(self) -> str | None:
        """The default as the CLI's help and docs/settings.md show it; None when unset."""
        if self.default is None:
            return None
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return self.text(self.default)


def row(env: str, parser: Parser, help: str, *, flag: str | None = None,
        for_workers: bool = True) -> dict[str, Any]:
    """A field's metadata that makes it a row of the settings table (with its default)."""
    return {"setting": {"env": env, "parser": parser, "help": help, "flag": flag,
                        "for_workers": for_workers}}


@dataclass(frozen=True)
class Settings:
    """Every setting grantkey reads, one field each: the settings table. See docs/settings.md."""

    data_dir: Path = field(default=Path("grantkey-data"), metadata=row(
        "GRANTKEY_DATA_DIR", DIRECTORY,
        "Where the embedded PostgreSQL and the server secret live.", flag="--data-dir"))
    database_url: str | None = field(default=None, metadata=row(
        "GRANTKEY_DATABASE_URL", TEXT,
        "Use this PostgreSQL (a role with CREATEDB and CREATEROLE) instead of the embedded one.",
        flag="--database-url"))
    secret: str | None = field(default=None, repr=False, metadata=row(
        "GRANTKEY_SECRET", TEXT, "The server secret (at least 32 characters)."))
    host: str = field(default="127.0.0.1", metadata=row(
        "GRANTKEY_HOST", TEXT, "Address to listen on.", flag="--host"))
    port: int = field(default=8000, metadata=row(
        "GRANTKEY_PORT", whole(), "TCP port to listen on.", flag="--port"))
    workers: int = field(default=1, metadata=row(
        "GRANTKEY_WORKERS", whole(minimum=1), "Server processes.", flag="--workers"))
    store_tokens: bool = field(default=True, metadata=row(
        "GRANTKEY_STORE_TOKENS", BOOLEAN,
        "Keep an AES-GCM sealed copy of each secret token so the master can read tokens back."))
    max_keys_per_user: int = field(default=0, metadata=row(
        "GRANTKEY_MAX_KEYS_PER_USER", whole(), "Regular keys per user, 0 for no limit."))
    key_max_lifetime_days: int = field(default=3650, metadata=row(
        "GRANTKEY_KEY_MAX_LIFETIME_DAYS", whole(),
        "Latest expires_at a new regular key may have, in days from now; 0 for no maximum."))
    key_require_expiry: bool = field(default=False, metadata=row(
        "GRANTKEY_KEY_REQUIRE_EXPIRY", BOOLEAN,
        "Refuse a new regular key that has no expires_at."))
    key_max_grace: int = field(default=86_400, metadata=row(
        "GRANTKEY_KEY_MAX_GRACE", whole(),
        "Longest grace_seconds of a token regeneration (the old token's overlap), 0 for none."))
    rate_limit_sql: str = field(default="0", metadata=row(
        "GRANTKEY_RATE_LIMIT_SQL", RATE,
        "Each user's SQL API requests, as REQUESTS/SECONDS[/BURST]; 0 for no limit."))
    rate_limit_copy: str = field(default="0", metadata=row(
        "GRANTKEY_RATE_LIMIT_COPY", RATE,
        "Each user's COPY requests (copyfrom, copyto), as REQUESTS/SECONDS[/BURST]; 0 for none."))
    rate_limit_jobs: str = field(default="0", metadata=row(
        "GRANTKEY_RATE_LIMIT_JOBS", RATE,
        "Each user's batch job requests, as REQUESTS/SECONDS[/BURST]; 0 for no limit."))
    rate_limit_tiles: str = field(default="0", metadata=row(
        "GRANTKEY_RATE_LIMIT_TILES", RATE,
        "Each user's Maps API tile requests, as REQUESTS/SECONDS[/BURST]; 0 for no limit."))
    rate_limit_maps: str = field(default="0", metadata=row(
        "GRANTKEY_RATE_LIMIT_MAPS", RATE,
        "Each user's other Maps API requests (maps made, named maps), as "
        "REQUESTS/SECONDS[/BURST]; 0 for no limit."))
    rate_limit_lookups: str = field(default="100/1/200", metadata=row(
        "GRANTKEY_RATE_LIMIT_LOOKUPS", RATE,
        "Token look-ups in the database per client address (unknown tokens, the Auth API), as "
        "REQUESTS/SECONDS[/BURST]; 0 for no limit."))
    trusted_proxies: str | None = field(default=None, metadata=row(
        "GRANTKEY_TRUSTED_PROXIES", PROXIES,
        "Proxies whose X-Forwarded-For names the client (addresses or CIDR networks, "
        "comma-separated); none by default.", for_workers=False))
    redis_url: str | None = field(default=None, repr=False, metadata=row(
        "GRANTKEY_REDIS_URL", TEXT,
        "Keep rate-limit buckets in this Redis (redis://…), shared by several servers."))
    key_cache_size: int = field(default=10_000, metadata=row(
        "GRANTKEY_KEY_CACHE_SIZE", whole(), "Entries in each of a process's data-API caches."))
    max_body_bytes: int = field(default=1_048_576, metadata=row(
        "GRANTKEY_MAX_BODY_BYTES", whole(minimum=1024),
        "Largest request body accepted, in bytes."))
    max_query_bytes: int = field(default=262_144, metadata=row(
        "GRANTKEY_MAX_QUERY_BYTES", whole(minimum=1024), "Longest SQL API q (in bytes)."))
    copy_max_bytes: int = field(default=2 * 1024**3, metadata=row(
        "GRANTKEY_COPY_MAX_BYTES", whole(minimum=1024),
        "Largest COPY FROM upload, in bytes as received (compressed bytes for gzip)."))
    copy_timeout: float = field(default=18_000.0, metadata=row(
        "GRANTKEY_COPY_TIMEOUT", SECONDS,
        "Seconds a COPY (copyfrom or copyto) may run, for any key."))
    job_timeout: float = field(default=43_200.0, metadata=row(
        "GRANTKEY_JOB_TIMEOUT", SECONDS,
        "Seconds a batch job may run, all its queries together."))
    job_max_queued: int = field(default=64, metadata=row(
        "GRANTKEY_JOB_MAX_QUEUED", whole(minimum=1),
        "Pending batch jobs one user may have."))
    job_max_payload: int = field(default=16_384, metadata=row(
        "GRANTKEY_JOB_MAX_PAYLOAD", whole(minimum=1024),
        "Largest batch job request, in characters of its JSON."))
    job_runners: int = field(default=1, metadata=row(
        "GRANTKEY_JOB_RUNNERS", whole(),
        "Batch jobs each server process runs at once, 0 for none."))
    job_lease: float = field(default=30.0, metadata=row(
        "GRANTKEY_JOB_LEASE", SECONDS,
        "Seconds after which a running job whose server stopped beating becomes unknown."))
    job_keep_days: int = field(default=30, metadata=row(
        "GRANTKEY_JOB_KEEP_DAYS", whole(minimum=1),
        "Days a finished batch job is kept."))
    log_level: str = field(default="info", metadata=row(
        "GRANTKEY_LOG_LEVEL", TEXT, "uvicorn's log level."))
    sql_timeout: float = field(default=25.0, metadata=row(
        "GRANTKEY_SQL_TIMEOUT", SECONDS,
        "Seconds a SQL API query of a regular or default public key may run."))
    sql_master_timeout: float = field(default=25.0, metadata=row(
        "GRANTKEY_SQL_MASTER_TIMEOUT", SECONDS,
        "Seconds a SQL API query of the master key may run."))
    sql_max_connections: int | None = field(default=None, metadata=row(  # None: sized by serve
        "GRANTKEY_SQL_MAX_CONNECTIONS", whole(minimum=1),
        "Connections logged in as key roles, in total, per server process."))
    sql_pool_wait: float = field(default=5.0, metadata=row(
        "GRANTKEY_SQL_POOL_WAIT", SECONDS,
        "Seconds a request waits for a free connection before 429."))
    sql_idle_seconds: float = field(default=60.0, metadata=row(
        "GRANTKEY_SQL_IDLE_SECONDS", SECONDS,
        "Idle key-role connections are closed after this long."))
    send_timeout: float = field(default=30.0, metadata=row(
        "GRANTKEY_SEND_TIMEOUT", SECONDS,
        "Seconds a streamed SQL API answer may wait for a client that reads nothing."))
    sql_key_share: float = field(default=0.5, metadata=row(
        "GRANTKEY_SQL_KEY_SHARE", SHARE,
        "Most of GRANTKEY_SQL_MAX_CONNECTIONS one key (one role; the default public key "
        "included) may hold at once, as a fraction."))
    pg_max_connections: int | None = field(default=None, metadata=row(  # None: from the machine
        "GRANTKEY_PG_MAX_CONNECTIONS", whole(minimum=20),
        "The embedded cluster's max_connections.", for_workers=False))
    pg_shared_buffers: str | None = field(default=None, metadata=row(  # None: from the machine
        "GRANTKEY_PG_SHARED_BUFFERS", LIMITED_SIZE,
        "The embedded cluster's shared_buffers.", for_workers=False))
    pg_bin_dir: Path | None = field(default=None, metadata=row(  # None: chosen (pg_binaries)
        "GRANTKEY_PG_BIN_DIR", DIRECTORY,
        "The PostgreSQL binaries that run the embedded cluster.", for_workers=False))
    sql_user_share: float = field(default=0.75, metadata=row(
        "GRANTKEY_SQL_USER_SHARE", SHARE,
        "Most of GRANTKEY_SQL_MAX_CONNECTIONS all the keys of one user together may hold at "
        "once, as a fraction."))
    temp_file_limit: str = field(default="1GB", metadata=row(
        "GRANTKEY_TEMP_FILE_LIMIT", SIZE, "Most temporary-file space one session may use."))
    storage_quota: str = field(default="-1", metadata=row(  # per user database; -1: none
        "GRANTKEY_STORAGE_QUOTA", QUOTA, "Most storage one user's database may hold."))
    max_header_bytes: int = field(default=65_536, metadata=row(
        "GRANTKEY_MAX_HEADER_BYTES", whole(minimum=1024),
        "Most bytes of header fields in one request."))
    maps_idle_days: int = field(default=30, metadata=row(
        "GRANTKEY_MAPS_IDLE_DAYS", whole(minimum=1),
        "Days a Maps API layergroup is kept after its last use."))
    tile_max_age: int = field(default=300, metadata=row(
        "GRANTKEY_TILE_MAX_AGE", whole(),
        "Seconds clients and caches may keep a tile (Cache-Control max-age)."))
    max_templates_per_user: int = field(default=1000, metadata=row(
        "GRANTKEY_MAX_TEMPLATES_PER_USER", whole(),
        "Named maps (templates) per user, 0 for no limit."))
    maplibre_url: str = field(default="https://unpkg.com/maplibre-gl@4.7.1/dist", metadata=row(
        "GRANTKEY_MAPLIBRE_URL", TEXT,
        "Where a layergroup's preview page loads MapLibre GL JS from (a folder holding "
        "maplibre-gl.js and maplibre-gl.css)."))
    header_timeout: float = field(default=10.0, metadata=row(
        "GRANTKEY_HEADER_TIMEOUT", SECONDS,
        "Seconds a request's head (request line and headers) may take to arrive."))
    body_timeout: float = field(default=30.0, metadata=row(
        "GRANTKEY_BODY_TIMEOUT", SECONDS,
        "Seconds a request's body may take to arrive after its head."))
    shutdown_seconds: float = field(default=10.0, metadata=row(
        "GRANTKEY_SHUTDOWN_SECONDS", SECONDS,
        "Seconds a server process may take to stop after SIGTERM, once its requests are done."))
    # only for the processes that need it (serve's start, the CLI); never given to workers
    superuser_url: str | None = field(default=None, repr=False, metadata=row(
        "GRANTKEY_SUPERUSER_URL", TEXT,
        "With a GRANTKEY_DATABASE_URL role that is not a superuser: a superuser login of the "
        "same server.", for_workers=False))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Each setting from its variable (unset or empty: its default), then the given
        overrides that are not None (command-line flags)."""
        env = os.environ if env is None else env
        values = {row.name: row.parse(env[row.env]) if env.get(row.env) else row.default
                  for row in SETTINGS}
        values.update((name, value) for name, value in overrides.items() if value is not None)
        return cls(**values)

    def as_env(self) -> dict[str, str]:
        """The variables that make `from_env` rebuild these settings in a worker process."""
        env = {}
        for row in SETTINGS:
            value = getattr(self, row.name)
            if row.for_workers and value is not None and value != "":
                env[row.env] = row.text(value)
        return env


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(name=column.name, default=column.default, **column.metadata["setting"])
    for column in fields(Settings))
SETTING = {row.name: row for row in SETTINGS}


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
