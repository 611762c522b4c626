"""Structure of the package: no module imports another module's private (``_x``) names.

A private name is an implementation detail of its module; a name two modules share gets a public
home (this is checked on the package source with the standard library's AST, function-level
imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO


def cross_module_private_imports(package: Path) -> list[str]:
    root = package.parent
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cmiexp"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(root).as_posix()}:{node.lineno}: {node.module}.{alias.name}")
    return found


def test_no_private_names_cross_modules():
    assert cross_module_private_imports(REPO / "cmiexp") == []


def test_the_check_sees_a_private_import(tmp_path):
    pkg = tmp_path / "cmiexp"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from cmiexp.b import _hidden\n    return _hidden\n")
    assert cross_module_private_imports(pkg) == ["cmiexp/a.py:2: cmiexp.b._hidden"]
