"""The layers import downwards only: `grpo` (the library) never imports Prefect or the application
(`grpo_pipeline`, whose tasks/, flows/ and deployments/ folders install under it), and every
package folder is installed under the name the code imports it by.

    pytest -q tests/test_layering.py
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "grpo"
ABOVE_THE_LIBRARY = ("prefect", "grpo_pipeline", "flows", "tasks", "deployments")


def _library_modules() -> list[str]:
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in LIBRARY.rglob("*.py")
        if p.name != "__main__.py"
    )


def test_no_library_module_imports_prefect_or_the_application() -> None:
    """Every import statement in grpo/, including those inside functions."""
    found = []
    for path in LIBRARY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                      if n.split(".")[0] in ABOVE_THE_LIBRARY]
    assert found == []


def test_the_library_imports_with_prefect_blocked() -> None:
    """Import every module of grpo/ in a fresh interpreter where `import prefect` (and the
    application's packages) raise ImportError."""
    blocked = ", ".join(repr(n) for n in ABOVE_THE_LIBRARY)
    code = (
        "import importlib, sys\n"
        f"for name in ({blocked},):\n"
        "    sys.modules[name] = None  # any import of it raises ImportError\n"
        f"for module in {_library_modules()!r}:\n"
        "    importlib.import_module(module)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'grpo'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'grpo.stages.registry'" in out.stdout and "'grpo.tracking'" in out.stdout


def test_every_package_folder_is_installed() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"grpo_pipeline.tasks": "tasks", "grpo_pipeline.flows": "flows",
               "grpo_pipeline.deployments": "deployments"}
    assert setuptools["package-dir"] == folders
    expected = {".".join(p.parent.relative_to(ROOT).parts) for p in LIBRARY.rglob("__init__.py")}
    expected |= {"grpo_pipeline", *folders}
    assert set(setuptools["packages"]) == expected
    for package, folder in folders.items():
        assert (ROOT / folder / "__init__.py").is_file(), package


COUNTDOWN_COLUMNS = re.compile(r"""["'](nums|target)["']|\bnums_plain\b|\{nums\}|\bnums=""")


def test_only_the_countdown_environment_names_its_columns() -> None:
    """Everything task-specific lives in grpo/envs/: outside Countdown's own modules (and the module
    that re-exports its public functions) no library code names Countdown's columns."""
    allowed = {LIBRARY / "countdown.py"}
    offenders = [
        f"{path.relative_to(LIBRARY.parent)}:{n}"
        for path in sorted(LIBRARY.rglob("*.py"))
        if path not in allowed and not path.is_relative_to(LIBRARY / "envs" / "countdown")
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if COUNTDOWN_COLUMNS.search(line)
    ]
    assert offenders == []
