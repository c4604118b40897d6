"""The packages' layering: `consumers` depends on `scheduler`, never the reverse."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import scheduler

# Imports every module of `scheduler` in a fresh interpreter and prints the `consumers` modules that
# got loaded on the way. Left out: `__main__` (importing it runs the CLI) and the migrations' env.py
# (alembic runs it, inside a migration).
_IMPORT_ALL = """
import importlib, json, pkgutil, sys
import scheduler

SCRIPTS = ("scheduler.__main__", "scheduler.migrations.env")
for module in pkgutil.walk_packages(scheduler.__path__, "scheduler."):
    if module.name in SCRIPTS:
        continue
    importlib.import_module(module.name)
print(json.dumps(sorted(name for name in sys.modules if name == "consumers" or name.startswith("consumers."))))
"""


def test_no_module_of_scheduler_imports_consumers() -> None:
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_no_statement_of_scheduler_imports_consumers_even_inside_a_function() -> None:
    package = Path(scheduler.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            found += [
                f"{path.relative_to(package)}:{node.lineno} {name}"
                for name in names
                if name.split(".")[0] == "consumers"
            ]
    assert found == []
