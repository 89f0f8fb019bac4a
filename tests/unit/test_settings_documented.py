"""Every GRANTKEY_* setting the code reads is documented in docs/settings.md, and the page
names none the code (or the test suite) does not read."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"\bGRANTKEY_[A-Z0-9_]+\b")


def names_in_code(folder: Path) -> set[str]:
    """GRANTKEY_* names in the string constants of every module under `folder`."""
    found: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found |= set(NAME.findall(node.value))
    return found


def test_every_setting_the_code_reads_is_documented_and_no_other() -> None:
    read = names_in_code(ROOT / "src" / "grantkey")
    documented = set(NAME.findall((ROOT / "docs" / "settings.md").read_text()))
    assert len(read) > 20  # the walk found the settings (not an empty tree)
    assert sorted(read - documented) == []
    assert sorted(documented - read - names_in_code(ROOT / "tests")) == []
