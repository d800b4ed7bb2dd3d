"""Package guards: fl_core stays free of web code; public names stay exported."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import fl_core

FL_CORE = Path(fl_core.__file__).parent
MODULES = sorted(p.stem for p in FL_CORE.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("path", sorted(FL_CORE.glob("*.py")), ids=lambda p: p.name)
def test_no_web_framework_imports(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"fastapi", "httpx", "starlette", "uvicorn", "pickle"}


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(f"fl_core.{name}")
    assert module.__doc__, f"fl_core.{name} has no module docstring"
    for exported in module.__all__:
        assert hasattr(module, exported), f"fl_core.{name}.__all__ lists missing {exported}"
