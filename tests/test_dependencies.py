"""The runtime stays standard-library only: tokenroute.py imports nothing else."""
from __future__ import annotations

import ast
import sys

import pytest

from conftest import REPO


def imported_modules(source: str) -> set[str]:
    """The top-level package of every import in `source`, wherever it stands (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


@pytest.mark.skipif(sys.version_info < (3, 10), reason="sys.stdlib_module_names is new in Python 3.10")
def test_tokenroute_imports_only_the_standard_library() -> None:
    modules = imported_modules((REPO / "tokenroute.py").read_text(encoding="utf-8"))
    assert {"json", "urllib", "ssl", "_thread"} <= modules  # the walk sees lazy imports
    assert sorted(modules - set(sys.stdlib_module_names)) == []  # novermin: skipped before 3.10


def test_the_import_walk_sees_imports_inside_functions() -> None:
    source = "import os\n\ndef f():\n    import mcp.types\n    from requests import get\n    from . import x\n"
    assert imported_modules(source) == {"os", "mcp", "requests"}
