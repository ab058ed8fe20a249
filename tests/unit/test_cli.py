from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date

import click
import pytest

from bcvk.cli import COMMANDS, root
from bcvk.cli.manpage import pages, render


def test_every_registered_command_imports() -> None:
    ctx = click.Context(root, info_name="bcvk")
    for name in COMMANDS:
        assert root.get_command(ctx, name) is not None, name


def test_help_is_fast_and_imports_no_command_module() -> None:
    code = (
        "import sys, time; t=time.monotonic();"
        "from bcvk.__main__ import main; rc = main(['--help']);"
        "heavy = [m for m in sys.modules if m.startswith(('rich', 'yaml', 'bcvk.image.inspect'))];"
        "print(time.monotonic()-t, heavy, file=sys.stderr)"
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    elapsed = time.monotonic() - start
    assert "Commands:" in result.stdout
    assert result.stderr.strip().endswith("[]"), result.stderr
    assert elapsed < 1.0  # generous here; the 0.3 s figure is measured in bench/


def test_man_page_for_images_matches_golden(golden: Callable[[str, str], None]) -> None:
    ctx = click.Context(root, info_name="bcvk")
    images = root.get_command(ctx, "images")
    assert images is not None
    golden("bcvk-images.1", render(images, "bcvk images", date(2026, 1, 1)))


def test_man_pages_one_per_group() -> None:
    names = set(pages(root))
    assert {"bcvk.1", "bcvk-images.1", "bcvk-doctor.1"} <= names
    assert all(text.startswith(".TH ") for text in pages(root).values())


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    from bcvk.__main__ import main

    assert main(["completion", shell]) == 0
    out = capsys.readouterr().out
    assert "_BCVK_COMPLETE" in out


def test_completion_lists_subcommands() -> None:
    from click.shell_completion import ShellComplete

    completer = ShellComplete(root, {}, "bcvk", "_BCVK_COMPLETE")
    names = {c.value for c in completer.get_completions(["images"], "")}
    assert names == {"list", "inspect"}


def test_unknown_command_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from bcvk.__main__ import main

    assert main(["frobnicate"]) == 2
    assert "No such command 'frobnicate'" in capsys.readouterr().err
