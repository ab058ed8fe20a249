"""`pip install .` of the checkout gives a working bcvk (mkosi has the same test).

The package is installed the way users install it: not editable, into a
fresh virtual environment, from a copy of the checkout, and run from a
directory where the source tree is not importable.  An editable install (what
`make` uses) resolves any module from the tree, so it cannot catch a
subpackage that the package metadata leaves out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.install

IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".coverage*"
)


def run(
    argv: list[str | Path], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """ARGV with nothing of this test run's environment pointing into the checkout."""
    full = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    full.update(env or {})
    result = subprocess.run(
        [os.fspath(a) for a in argv], cwd=cwd, capture_output=True, text=True, env=full, check=False
    )
    assert result.returncode == 0, f"{argv} failed ({result.returncode}):\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin directory of a fresh venv with `pip install .` of a copy of the checkout."""
    base = tmp_path_factory.mktemp("install")
    source = base / "src"
    shutil.copytree(ROOT, source, ignore=IGNORE, symlinks=True)
    venv = base / "venv"
    # The base interpreter, not this venv's: the new venv must see nothing of ours.
    python = getattr(sys, "_base_executable", sys.executable)
    run([python, "-m", "venv", venv], cwd=base)
    run([venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", "."], cwd=source)
    return venv / "bin"


def test_every_module_is_installed(installed: Path, tmp_path: Path) -> None:
    listing = (
        "import importlib, json, pkgutil, bcvk;"
        "names = [m.name for m in pkgutil.walk_packages(bcvk.__path__, 'bcvk.')];"
        "[importlib.import_module(n) for n in names];"
        "print(json.dumps({'file': bcvk.__file__, 'modules': names}))"
    )
    found = json.loads(run([installed / "python", "-c", listing], cwd=tmp_path).stdout)
    assert "site-packages" in found["file"], "imported the checkout, not the installed copy"
    source = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "bcvk").rglob("*.py")
    } - {"bcvk"}
    assert source <= set(found["modules"]), source - set(found["modules"])
    typed = Path(found["file"]).parent / "py.typed"
    assert typed.is_file()


def test_installed_commands_work(installed: Path, tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": os.fspath(runtime), "XDG_CACHE_HOME": os.fspath(tmp_path / "cache")}
    assert "Usage: bcvk" in run([installed / "bcvk", "--help"], cwd=tmp_path).stdout
    assert "podman-bootc" in run([installed / "bcvk", "pb", "--help"], cwd=tmp_path).stdout
    helped = run([installed / "podman-bootc", "--help"], cwd=tmp_path).stdout
    assert helped.startswith("Usage: podman-bootc")
    assert "OUTPUT" in run([installed / "bcvk", "to-disk", "--help"], cwd=tmp_path).stdout
    # Real commands through every layer, none of which boots a VM: pb and
    # libvirt against libvirt's in-process test driver, the image store
    # through podman, the ephemeral registry and the per-image cache.
    listed = run(
        [installed / "bcvk", "pb", "-c", "test:///default", "list", "--format", "json"],
        cwd=tmp_path,
        env=env,
    )
    assert json.loads(listed.stdout) == []
    domains = run(
        [
            installed / "bcvk",
            "libvirt",
            "-c",
            "test:///default",
            "list",
            "--all",
            "--format",
            "json",
        ],  # fmt: skip
        cwd=tmp_path,
        env=env,
    )
    assert json.loads(domains.stdout) == []
    images = run([installed / "bcvk", "images", "list", "--format", "json"], cwd=tmp_path)
    assert isinstance(json.loads(images.stdout), list)
    ps = run([installed / "bcvk", "ephemeral", "ps", "--format", "json"], cwd=tmp_path, env=env)
    assert json.loads(ps.stdout) == []
    cache = run([installed / "bcvk", "cache", "list", "--format", "json"], cwd=tmp_path, env=env)
    assert json.loads(cache.stdout) == []
