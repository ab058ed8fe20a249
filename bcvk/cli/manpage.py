"""Man pages generated from the click definitions, one per command group.

``python -m bcvk.cli.manpage OUTDIR`` writes ``bcvk.1`` and ``bcvk-GROUP.1``.
``render`` is a pure function of a command tree, tested with golden files.
"""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path

import click

from bcvk import __version__


def _escape(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln if ln.startswith((".", "'")) else ln) for ln in text.splitlines())


def _paragraphs(text: str) -> str:
    out: list[str] = []
    for block in text.strip().split("\n\n"):
        block = block.strip()
        if block.startswith("\b"):
            out.append(".nf\n" + _escape(block[1:].strip("\n")) + "\n.fi")
        else:
            out.append(".PP\n" + _escape(" ".join(block.split())))
    return "\n".join(out)


def _options(ctx: click.Context, command: click.Command) -> str:
    lines: list[str] = []
    for param in command.get_params(ctx):
        if isinstance(param, click.Argument):
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        flags, help_text = record
        lines += [".TP", f"\\fB{_escape(flags)}\\fR", _escape(help_text or "")]
    return "\n".join(lines)


def _section(ctx: click.Context, command: click.Command, path: str) -> list[str]:
    out = [f'.SS "{_escape(path)}"']
    usage = " ".join(command.collect_usage_pieces(ctx))
    out.append(f"\\fB{_escape(path)}\\fR {_escape(usage)}")
    if command.help:
        out.append(_paragraphs(command.help))
    options = _options(ctx, command)
    if options:
        out.append(options)
    return out


def _walk(ctx: click.Context, command: click.Command, path: str) -> list[str]:
    out: list[str] = []
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            sub_ctx = click.Context(sub, parent=ctx, info_name=name)
            out += _walk(sub_ctx, sub, f"{path} {name}")
    else:
        out += _section(ctx, command, path)
    return out


def render(command: click.Command, name: str, today: date | None = None) -> str:
    """The roff source of the man page for COMMAND, invoked as NAME."""
    today = today or date(2026, 1, 1)
    ctx = click.Context(command, info_name=name)
    title = name.replace(" ", "-")
    summary = (command.short_help or command.get_short_help_str(200)).rstrip(".")
    lines = [
        f'.TH "{title.upper()}" 1 "{today.isoformat()}" "bcvk {__version__}" "bcvk manual"',
        ".SH NAME",
        f"{_escape(title)} \\- {_escape(summary)}",
        ".SH SYNOPSIS",
        f"\\fB{_escape(name)}\\fR {_escape(' '.join(command.collect_usage_pieces(ctx)))}",
    ]
    if command.help:
        lines += [".SH DESCRIPTION", _paragraphs(command.help)]
    options = _options(ctx, command)
    if options:
        lines += [".SH OPTIONS", options]
    if isinstance(command, click.Group) and name != "bcvk":
        lines += [".SH COMMANDS", *_walk(ctx, command, name)]
    lines += [".SH SEE ALSO", "\\fBbcvk\\fR(1)"]
    return "\n".join(lines) + "\n"


def pages(root: click.Group) -> dict[str, str]:
    ctx = click.Context(root, info_name="bcvk")
    result = {"bcvk.1": render(root, "bcvk")}
    for name in root.list_commands(ctx):
        command = root.get_command(ctx, name)
        if command is not None and not command.hidden:
            result[f"bcvk-{name}.1"] = render(command, f"bcvk {name}")
    return result


def main(argv: list[str]) -> int:
    from bcvk.cli import root

    outdir = Path(argv[0] if argv else "build/man")
    outdir.mkdir(parents=True, exist_ok=True)
    for filename, text in pages(root).items():
        (outdir / filename).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
