"""The layers are what docs/architecture.md says they are, checked on the source itself:
only `db/` talks to PostgreSQL (imports psycopg, runs SQL text), only `http/` knows
Starlette, and each layer imports only those below it: domain <- db <- services <- http,
cli. A new import across a line fails here with the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "src" / "grantkey"
LAYERS = ("domain", "db", "services", "http", "cli")
# what each package may not import, of grantkey's own packages
FORBIDDEN_PACKAGES = {
    "domain": {"db", "services", "http", "cli"},
    "db": {"services", "http", "cli"},
    "services": {"http", "cli"},
    "http": {"db", "cli"},
    "cli": {"db"},
}
# third-party packages and the only packages that may import them
CONFINED = {"psycopg": {"db"}, "psycopg_pool": {"db"}, "starlette": {"http"},
            "uvicorn": {"http", "cli"}}
SQL_CALLS = {"execute", "executemany", "notifies", "copy"}


def modules() -> list[Path]:
    return sorted(SOURCE.rglob("*.py"))


def package_of(path: Path) -> str:
    """`db`, `http`, ... or `top` for grantkey/errors.py and the like."""
    parts = path.relative_to(SOURCE).parts
    return parts[0] if len(parts) > 1 else "top"


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def crossings(path: Path) -> list[str]:
    package = package_of(path)
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(SOURCE.parent)
    wrong = []
    for line, name in imported(tree):
        top, _, rest = name.partition(".")
        if top == "grantkey":
            target = rest.partition(".")[0]
            if target in FORBIDDEN_PACKAGES.get(package, set()) or (
                    package == "top" and target in LAYERS):
                wrong.append(f"{where}:{line} imports {name} ({package} -> {target})")
        elif top in CONFINED and package not in CONFINED[top]:
            wrong.append(f"{where}:{line} imports {name} (only {sorted(CONFINED[top])} may)")
    if package != "db":
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in SQL_CALLS):
                wrong.append(f"{where}:{node.lineno} calls .{node.func.attr}() "
                             "(SQL runs in db/ only)")
    return wrong


def test_every_layer_is_checked() -> None:
    packages = {package_of(path) for path in modules()}
    assert packages == {*LAYERS, "top"}, packages


def test_no_import_crosses_a_layer_and_only_db_runs_sql() -> None:
    wrong = [line for path in modules() for line in crossings(path)]
    assert wrong == [], "\n".join(wrong)


@pytest.mark.parametrize(("package", "source", "expected"), [
    ("services", "import psycopg\n", "only ['db'] may"),
    ("services", "from psycopg import sql\n", "only ['db'] may"),
    ("domain", "from grantkey.db.cluster import Cluster\n", "(domain -> db)"),
    ("http", "from grantkey.db import keys\n", "(http -> db)"),
    ("db", "from grantkey.services.sql import SqlService\n", "(db -> services)"),
    ("services", "from starlette.requests import Request\n", "only ['http'] may"),
    ("http", "async def f(conn):\n    await conn.execute('SELECT 1')\n", "SQL runs in db/"),
])
def test_the_check_catches_each_kind_of_crossing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, package: str, source: str, expected: str,
) -> None:
    """The check itself fails on a planted crossing (it is not vacuous)."""
    root = tmp_path / "grantkey"
    (root / package).mkdir(parents=True)
    planted = root / package / "planted.py"
    planted.write_text(source)
    monkeypatch.setattr(__import__(__name__, fromlist=["SOURCE"]), "SOURCE", root)
    wrong = crossings(planted)
    assert len(wrong) == 1 and expected in wrong[0], wrong


def docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def test_names_of_postgresql_objects_come_from_domain_names_only() -> None:
    """`gk_` names and patterns are built in one place (`domain/names.py`); elsewhere the
    prefix appears only in docstrings."""
    wrong = []
    for path in modules():
        if path.relative_to(SOURCE).as_posix() == "domain/names.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        skip = docstrings(tree)
        wrong += [f"{path.relative_to(SOURCE.parent)}:{node.lineno}"
                  for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and "gk_" in node.value and id(node) not in skip]
    assert wrong == [], wrong
