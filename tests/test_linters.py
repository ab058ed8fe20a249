"""The linters are tests: mypy --strict, ruff check and ruff format."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lint

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["bcvk", "tests", "bench"]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([sys.executable, "-m", "mypy", "--strict", "bcvk", "tests"], id="mypy"),
        # Apart: bench/libvirt.py would shadow the libvirt binding in one mypy run.
        pytest.param([sys.executable, "-m", "mypy", "--strict", "bench"], id="mypy-bench"),
        pytest.param([sys.executable, "-m", "ruff", "check", *TARGETS], id="ruff-check"),
        pytest.param(
            [sys.executable, "-m", "ruff", "format", "--check", *TARGETS], id="ruff-format"
        ),
    ],
)
def test_linter(argv: list[str]) -> None:
    result = _run(*argv)
    assert result.returncode == 0, result.stdout + result.stderr
