"""`bcvk up | down | status | ssh | config show`: the VMs of a bcvk.toml."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from bcvk.cli import CONTEXT, output
from bcvk.cli import options as shared

if TYPE_CHECKING:
    from bcvk.project import Project

F = TypeVar("F", bound=Callable[..., Any])
PASSTHROUGH = {**CONTEXT, "allow_interspersed_args": False, "ignore_unknown_options": True}

FILE_HELP = """
The file (./bcvk.toml, or -f FILE) has one table per VM and optional
defaults for all of them:

\b
    [defaults]
    image = "localhost/my-app:latest"
    memory = "2G"
\b
    [vm.web]
    port = ["8080:80"]
    bind-ro = ["./site:/srv/www"]
\b
    [vm.db]
    memory = "4G"
    disk-size = "20G"

Keys are the flags of `bcvk libvirt run`: image, memory, vcpus, itype,
disk-size, filesystem, karg, port, bind, bind-ro, label, firmware, ssh-key,
connect (a libvirt URI), and kind = "libvirt" (persistent, the default) or
"ephemeral" (a throwaway VM, started detached; image, memory, vcpus, itype,
karg, port, bind, bind-ro). Relative host paths are relative to the file.
"""


def file_option(fn: F) -> F:
    return click.option(
        "-f", "--file", "file", metavar="FILE", help="The project file.  [default: ./bcvk.toml]"
    )(fn)


def _load(file: str | None) -> Project:
    from bcvk import project

    return project.load(file)


def _report(done: list[tuple[str, str]]) -> None:
    for name, what in done:
        click.echo(f"{name}: {what}")


@click.command(context_settings=CONTEXT, epilog=FILE_HELP)
@file_option
@click.option("--recreate", is_flag=True, help="Replace VMs whose settings differ from the file.")
@click.option("--ssh-wait", is_flag=True, help="Wait until every VM answers SSH.")
@shared.timeout_option("--timeout", 600.0, "How long --ssh-wait waits.")
@click.argument("names", nargs=-1, metavar="[NAME]...")
def up(file: str | None, recreate: bool, ssh_wait: bool, timeout: float,
       names: tuple[str, ...]) -> None:  # fmt: skip
    """Create and start the file's VMs (all, or NAMEs) so that they match it.

    A VM whose settings changed is refused unless --recreate; a domain of the
    same name that bcvk did not create from this file is always refused.
    Nothing is created when any VM in the file is invalid.
    """
    from bcvk import project

    _report(project.up(_load(file), names, recreate=recreate, ssh_wait=ssh_wait,
                       timeout=timeout))  # fmt: skip


@click.command(context_settings=CONTEXT)
@file_option
@click.option("--rm", "remove", is_flag=True, help="Remove the VMs (disk and key too).")
@click.argument("names", nargs=-1, metavar="[NAME]...")
def down(file: str | None, remove: bool, names: tuple[str, ...]) -> None:
    """Stop (or --rm: remove) the file's VMs; only those bcvk created from it."""
    from bcvk import project

    _report(project.down(_load(file), names, remove=remove))


@click.command(context_settings=CONTEXT)
@file_option
@shared.format_option("table", "json")
@click.argument("names", nargs=-1, metavar="[NAME]...")
def status(file: str | None, fmt: str, names: tuple[str, ...]) -> None:
    """Each VM of the file: its state, SSH port and whether it matches the file."""
    from bcvk import project

    output.emit_listing(
        fmt,
        project.status(_load(file), names),
        ["NAME", "KIND", "STATE", "SSH", "FILE"],
        lambda s: (s.name, s.vm.kind.value, s.state, s.ssh_port or "-",
                   s.sync + (f": {', '.join(s.differences)}" if s.differences else "")),
    )  # fmt: skip


@click.command(context_settings=PASSTHROUGH)
@file_option
@shared.timeout_option("--ssh-timeout", 240.0, "How long to wait for sshd.")
@click.argument("name")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def ssh(ctx: click.Context, file: str | None, ssh_timeout: float, name: str,
        args: tuple[str, ...]) -> None:  # fmt: skip
    """Connect to VM NAME of ./bcvk.toml (or -f FILE), whichever kind it is,
    else to the ephemeral VM NAME; ARGS are a command to run."""
    from pathlib import Path

    from bcvk import ephemeral, project

    words = list(args[1:] if args[:1] == ("--",) else args)
    if file is not None or (Path.cwd() / project.FILE_NAME).is_file():
        proj = _load(file)
        if file is not None or name in {vm.name for vm in proj.vms}:
            ctx.exit(project.ssh(proj, name, words, timeout=ssh_timeout))
    ctx.exit(ephemeral.ssh_into(name, words, timeout=ssh_timeout))


@click.group(context_settings=CONTEXT)
def config() -> None:
    """The project file (bcvk.toml)."""


@config.command(context_settings=CONTEXT)
@file_option
@click.option(
    "--format", "fmt", type=click.Choice(["toml", "json"]), default="toml", show_default=True,
    help="TOML (a file `up` reads back) or JSON.",
)  # fmt: skip
def show(file: str | None, fmt: str) -> None:
    """Print the effective configuration: every VM with the defaults applied."""
    from bcvk import project

    proj = _load(file)
    if fmt == "json":
        output.emit_json(project.effective(proj))
    else:
        click.echo(project.to_toml(proj), nl=False)
