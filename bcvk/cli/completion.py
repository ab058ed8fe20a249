"""`bcvk completion SHELL`: print click's completion script for a shell."""

from __future__ import annotations

import click

from bcvk.cli import CONTEXT


@click.command(context_settings=CONTEXT)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print a completion script for SHELL.

    \b
    bash: eval "$(bcvk completion bash)"   (or save to /etc/bash_completion.d/bcvk)
    zsh:  eval "$(bcvk completion zsh)"
    fish: bcvk completion fish > ~/.config/fish/completions/bcvk.fish
    """
    from click.shell_completion import get_completion_class

    root = ctx.find_root().command
    prog = ctx.find_root().info_name or "bcvk"
    cls = get_completion_class(shell)
    assert cls is not None
    var = "_{}_COMPLETE".format(prog.replace("-", "_").upper())
    click.echo(cls(root, {}, prog, var).source())
