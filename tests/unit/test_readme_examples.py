"""Every `bcvk …` line in the README's code blocks parses with the real CLI:
its verbs exist and its options, choices and argument counts are accepted
(nothing runs: remote URIs and placeholders like IMAGE need no host)."""

from __future__ import annotations

import shlex
from pathlib import Path

import click
import pytest

from bcvk.cli import root
from tests.conftest import ROOT


def readme_lines() -> list[str]:
    found: list[str] = []
    block = False
    pending = ""
    for raw in (ROOT / "README.md").read_text().splitlines():
        if raw.startswith("```"):
            block = not block
            continue
        line = f"{pending} {raw.strip()}" if pending else raw
        pending = ""
        if block and line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1]
        elif block and line.startswith("bcvk "):
            found.append(line)
    return found


def parse(argv: list[str]) -> list[str]:
    """Parse ARGV as `bcvk` does without invoking anything; the groups on its path."""
    command: click.Command = root
    ctx: click.Context | None = None
    path = [argv[0]]
    args = argv[1:]
    while True:
        ctx = command.make_context(path[-1], args, parent=ctx)
        if not isinstance(command, click.Group):
            return path[:-1]
        rest = [*ctx._protected_args, *ctx.args]
        name, sub, args = command.resolve_command(ctx, rest)
        assert name is not None
        assert sub is not None
        command = sub
        path.append(name)


def commands(line: str) -> list[list[str]]:
    """LINE's commands: `[OPTIONAL]` taken, `a|b` choices as the first, a
    redirection dropped, and `X | Y` alternatives each with X's verb prefix."""
    words = shlex.split(line, comments=True)
    if ">" in words:
        words = words[: words.index(">")]
    alternatives: list[list[str]] = [[]]
    for word in words:
        if word == "|":
            alternatives.append([])
        else:
            alternatives[-1].append(word.strip("[]").split("|")[0])
    first, *others = alternatives
    prefix = parse(first) if others else []
    return [first] + [prefix + alt for alt in others]


LINES = readme_lines()


def test_the_readme_has_examples() -> None:
    assert len(LINES) > 30
    assert any("qemu+ssh://" in line for line in LINES)


@pytest.mark.parametrize("line", LINES)
def test_readme_example_parses(line: str, tmp_path: Path) -> None:
    for argv in commands(line):
        # The user's files (`~/.ssh/id_ed25519.pub`) exist where the example runs.
        for i, word in enumerate(argv):
            if word.startswith("~/"):
                argv[i] = str(tmp_path / word[2:])
                Path(argv[i]).parent.mkdir(parents=True, exist_ok=True)
                Path(argv[i]).touch()
        try:
            parse(argv)
        except click.ClickException as exc:
            pytest.fail(f"{' '.join(argv)}: {exc.format_message()}")
