"""The arrows run one way: experiments and bench -> fedinspect -> services -> fl_core.

Each product module is imported alone in a fresh interpreter: none pulls in ``bench``
or ``experiments`` (which are not installed with the product), and the package list
that goes into the wheel holds neither.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("fl_core", "server_service", "edge_service", "fedinspect")
OUTSIDE = ("bench", "experiments")
#: what the services share from the fedinspect package: its web pages, the plumbing of
#: both apps (service) and their ASGI guards; fl_core imports none of them
SHARED = {"fedinspect", "fedinspect.pages", "fedinspect.service", "fedinspect.guards"}


def _modules(package: str) -> list[str]:
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        # __main__ runs a command; a migrations/env.py runs only inside alembic
        if parts[-1] == "__main__" or parts[-2:] == ["migrations", "env"]:
            continue
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


@pytest.mark.parametrize("module", [m for p in ("fedinspect",) for m in _modules(p)])
def test_product_modules_import_neither_bench_nor_experiments(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, module], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert not loaded & set(OUTSIDE), f"{module} imports {sorted(loaded & set(OUTSIDE))}"


@pytest.mark.parametrize(
    ("module", "below"),
    [
        ("fedinspect.report", set()),
        ("fedinspect.launcher", set()),
        ("fedinspect.demo", {"fedinspect.launcher", "fedinspect.report"}),
    ],
)
def test_the_demo_uses_report_and_launcher_and_neither_uses_it(
    module: str, below: set[str]
) -> None:
    """No circle: the demo imports its report and the launcher, never the other way."""
    probe = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("fedinspect."))))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe, module], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1])) - {module}
    assert loaded - SHARED == below


def test_services_and_fl_core_import_no_module_of_the_cli_package() -> None:
    """Below fedinspect only its pages and the services' shared plumbing are used."""
    probe = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("fedinspect", "bench",
    "experiments")))))
"""
    modules = [m for p in PRODUCT[:3] for m in _modules(p)]
    done = subprocess.run(
        [sys.executable, "-c", probe, *modules], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert loaded <= SHARED


def test_fl_core_imports_nothing_of_the_fedinspect_package() -> None:
    probe = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("fedinspect"))))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe, *_modules("fl_core")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_wheel_holds_the_product_only() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(str(ROOT), include=include)
    assert {p.split(".")[0] for p in packages} == set(PRODUCT)
    assert (ROOT / "bench" / "__main__.py").is_file()  # python -m bench, from a checkout


def test_the_cli_package_holds_the_cli_demo_and_launcher_only() -> None:
    names = {p.stem for p in (ROOT / "fedinspect").glob("*.py")}
    assert names == {
        "__init__",
        "__main__",
        "cli",
        "demo",
        "launcher",
        "report",
        "pages",
        "settings_doc",
        "service",
        "guards",
    }
