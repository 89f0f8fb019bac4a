"""Every setting is documented in docs/settings.md as the settings table has it, every
GRANTKEY_* setting the code reads is documented, and the page names none the code (or the
test suite) does not read. The table (`grantkey.settings.SETTINGS`) also drives the
environment, the CLI's flags and what `serve` hands its workers: checked here too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest

from grantkey.cli.main import main
from grantkey.errors import SetupError
from grantkey.settings import SETTINGS, Setting, Settings

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"\bGRANTKEY_[A-Z0-9_]+\b")
PAGE = (ROOT / "docs" / "settings.md").read_text()
ROW = re.compile(r"^\| `(GRANTKEY_[A-Z0-9_]+)` \| (.*?) \| (.*?) \| (.*) \|$", re.MULTILINE)
DOCUMENTED = {env: (flag, default, meaning) for env, flag, default, meaning in ROW.findall(PAGE)}


def names_in_code(folder: Path) -> set[str]:
    """GRANTKEY_* names in the string constants of every module under `folder`."""
    found: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found |= set(NAME.findall(node.value))
    return found


def test_every_setting_the_code_reads_is_documented_and_no_other() -> None:
    read = names_in_code(ROOT / "src" / "grantkey") | {row.env for row in SETTINGS}
    documented = set(NAME.findall(PAGE))
    assert len(read) > 20  # the walk found the settings (not an empty tree)
    assert sorted(read - documented) == []
    assert sorted(documented - read - names_in_code(ROOT / "tests")) == []


def test_the_pages_table_has_one_row_per_setting_and_no_other() -> None:
    assert len(ROW.findall(PAGE)) == len(DOCUMENTED)  # no setting twice
    assert sorted(DOCUMENTED) == sorted(row.env for row in SETTINGS)
    assert all(row.env == "GRANTKEY_" + row.name.upper() for row in SETTINGS)


@pytest.mark.parametrize("row", SETTINGS, ids=lambda row: row.env)
def test_each_row_of_the_page_says_what_the_table_says(row: Setting) -> None:
    flag, default, meaning = DOCUMENTED[row.env]
    assert flag == (f"`{row.flag}`" if row.flag else "—")
    if row.shown_default is None:  # unset: the page says what happens then, in italics
        assert default.startswith("*(")
    else:
        assert default.split("`")[1] == row.shown_default
    # the page's meaning starts with the help sentence (the CLI's --help, for a flag)
    assert meaning.replace("`", "").startswith(row.help.rstrip(".")), meaning[:120]


@pytest.mark.parametrize("row", SETTINGS, ids=lambda row: row.env)
def test_each_setting_reads_its_variable_and_reads_back_what_it_hands_workers(
    row: Setting,
) -> None:
    example = {"GRANTKEY_DATABASE_URL": "dbname=x", "GRANTKEY_SECRET": "s" * 40,
               "GRANTKEY_SUPERUSER_URL": "dbname=y", "GRANTKEY_PG_SHARED_BUFFERS": "2GB",
               "GRANTKEY_PG_MAX_CONNECTIONS": "40", "GRANTKEY_SQL_MAX_CONNECTIONS": "9",
               "GRANTKEY_TRUSTED_PROXIES": "10.0.0.1,192.168.0.0/16"}
    default = Settings.from_env({})
    assert getattr(default, row.name) == row.default
    value = row.parse(example.get(row.env) or row.text(row.default))
    settings = Settings.from_env({row.env: row.text(value)})
    assert getattr(settings, row.name) == value
    handed = settings.as_env()
    assert (row.env in handed) == row.for_workers  # serve's workers rebuild it, or never see it
    rebuilt = Settings.from_env(handed)
    assert getattr(rebuilt, row.name) == (value if row.for_workers else row.default)


@pytest.mark.parametrize("row", [row for row in SETTINGS if row.parser.metavar != "TEXT"],
                         ids=lambda row: row.env)
def test_a_bad_value_is_one_line_naming_the_setting(row: Setting, tmp_path: Path) -> None:
    bad = tmp_path / "a-file" if row.parser.metavar == "DIRECTORY" else "bad"
    if isinstance(bad, Path):
        bad.write_text("")
    with pytest.raises(SetupError) as raised:
        Settings.from_env({row.env: str(bad)})
    message = str(raised.value)
    assert message.startswith(f"{row.env} must be ") and "\n" not in message


def test_the_cli_flags_are_the_tables() -> None:
    flags: dict[str, click.Option] = {}
    for command in [main.commands["serve"], *(
            sub for group in main.commands.values() if isinstance(group, click.Group)
            for sub in group.commands.values())]:
        for option in command.params:
            if isinstance(option, click.Option) and option.name in {r.name for r in SETTINGS}:
                flags.setdefault(option.opts[0], option)
                assert option.default is None  # the variable, read by from_env, is the default
    assert sorted(flags) == sorted(row.flag for row in SETTINGS if row.flag)
    for row in SETTINGS:
        if row.flag:
            assert flags[row.flag].help is not None
            assert flags[row.flag].help.startswith(f"{row.help} [env: {row.env}]")
