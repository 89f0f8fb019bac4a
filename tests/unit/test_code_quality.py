"""ruff and mypy --strict stay clean, and modules stay small."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 600


def test_no_module_over_600_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in [*ROOT.glob("src/**/*.py"), *ROOT.glob("tests/**/*.py")]
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_ruff_is_clean() -> None:
    if shutil.which("ruff") is None and not _module_available("ruff"):
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "bench"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    if not _module_available("mypy"):
        pytest.skip("mypy is not installed (pip install -e '.[test]')")
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _module_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
