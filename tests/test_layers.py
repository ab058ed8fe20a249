"""The architecture is a contract: layers, package APIs, private names, process starts.

``docs/ARCHITECTURE.md`` describes the layers; ``pyproject.toml`` states them
for import-linter.  These tests check the real tree keeps them, and that
each check fails when the rule is broken (on a copy of the tree).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BIN_DIR, ROOT

pytestmark = pytest.mark.lint

MAX_TOP_LEVEL_MODULES = 12
MAX_MODULE_LINES = 600


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over the ``bcvk`` package found in TREE, with the project's contracts."""
    env = {**os.environ, "PYTHONPATH": os.fspath(tree)}
    return subprocess.run(
        [
            os.fspath(BIN_DIR / "lint-imports"),
            "--config",
            os.fspath(tree / "pyproject.toml"),
            "--no-cache",
        ],  # fmt: skip
        cwd=tree,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


def copy_of_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "bcvk", tree / "bcvk", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_layer_contracts_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # a host tool wrapper reaching up into a feature
        ("bcvk/host/qmp.py", "from bcvk import ephemeral", "Layers"),
        # anything importing the CLI
        ("bcvk/to_disk/options.py", "import bcvk.cli", "Layers"),
        # a feature reaching into another feature's internals, not its API
        ("bcvk/libvirt/domains.py", "from bcvk.to_disk import native", "package API"),
        ("bcvk/cli/images.py", "from bcvk.ephemeral import cache", "package API"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    tree = copy_of_tree(tmp_path)
    target = tree / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    assert "1 broken" in result.stdout
    assert any(broken in ln and "BROKEN" in ln for ln in result.stdout.splitlines())


def private_imports(source: str) -> list[str]:
    """``from bcvk.x import _name`` and ``module._name`` on an imported bcvk module."""
    found: list[str] = []
    modules: set[str] = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bcvk"):
            for alias in node.names:
                name = alias.name
                if name.startswith("_") and not name.startswith("__"):
                    found.append(f"from {node.module} import {name}")
                modules.add(alias.asname or name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("bcvk") and alias.asname:
                    modules.add(alias.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    offenders = {
        os.fspath(path.relative_to(ROOT)): found
        for path in sorted((ROOT / "bcvk").rglob("*.py"))
        if (found := private_imports(path.read_text()))
    }
    assert offenders == {}


def test_the_private_name_check_sees_both_forms() -> None:
    source = "from bcvk.libvirt import vms\nfrom bcvk.x import _y\nvms._read(1)\n"
    assert private_imports(source) == ["from bcvk.x import _y", "vms._read"]


def test_the_package_has_few_top_level_modules_and_no_long_ones() -> None:
    top = sorted(p.name for p in (ROOT / "bcvk").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    long = {
        os.fspath(p.relative_to(ROOT)): n
        for p in (ROOT / "bcvk").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_only_run_py_may_start_a_process() -> None:
    """ruff's banned-API rule refuses a process start anywhere else in bcvk."""
    probe = "import subprocess\n\nsubprocess.run(['true'], check=True)\n"

    def check(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ruff", "check", "--stdin-filename", name, "-"],
            cwd=ROOT,
            input=probe,
            capture_output=True,
            text=True,
            check=False,
        )

    refused = check("bcvk/host/probe.py")
    assert refused.returncode != 0
    assert "TID251" in refused.stdout
    assert check("bcvk/run.py").returncode == 0
