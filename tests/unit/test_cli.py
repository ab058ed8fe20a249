from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from datetime import date

import click
import pytest

from bcvk.cli import COMMANDS, root
from bcvk.cli.manpage import pages, render


def test_every_registered_command_imports() -> None:
    # get_command raises if a module or attribute in COMMANDS is wrong.
    ctx = click.Context(root, info_name="bcvk")
    commands = {name: root.get_command(ctx, name) for name in COMMANDS}
    assert all(isinstance(c, click.Command) for c in commands.values())


def test_help_imports_no_command_module() -> None:
    # What keeps `bcvk --help` fast (bench/ measures how fast): nothing heavy loads.
    code = (
        "import sys; from bcvk.__main__ import main; rc = main(['--help']);"
        "print([m for m in sys.modules if m.startswith(('rich', 'yaml', 'bcvk.image', "
        "'bcvk.ephemeral', 'bcvk.to_disk', 'bcvk.libvirt', 'bcvk.pb'))], file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "Commands:" in result.stdout
    assert result.stderr.strip().endswith("[]"), result.stderr


def test_cli_choices_are_the_enums() -> None:
    """Choices the CLI spells out (to keep --help from importing a pipeline) match them."""
    from bcvk.cli import options
    from bcvk.ephemeral.options import RootfsMode
    from bcvk.to_disk import DiskFormat, Filesystem, Installer, PartitionTable
    from bcvk.values import Firmware

    def choices(group: str, sub: str, param: str) -> list[str]:
        ctx = click.Context(root, info_name="bcvk")
        command = root.get_command(ctx, group)
        assert command is not None
        if sub:
            assert isinstance(command, click.Group)
            command = command.get_command(ctx, sub)
            assert command is not None
        found = next(p for p in command.params if p.name == param)
        assert isinstance(found.type, click.Choice)
        return list(found.type.choices)

    assert list(options.FILESYSTEMS) == [f.value for f in Filesystem]
    assert choices("to-disk", "", "fmt") == [f.value for f in DiskFormat]
    assert choices("to-disk", "", "installer") == [i.value for i in Installer]
    assert choices("to-disk", "", "partition_table") == [t.value for t in PartitionTable]
    assert choices("to-disk", "", "firmware") == ["uefi", "bios", "both"]
    assert all(Firmware(f) for f in choices("libvirt", "run", "firmware") if f != "uefi-insecure")
    assert choices("ephemeral", "run", "rootfs") == [m.value for m in RootfsMode]


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
