"""The command-line interface: the only layer that knows click.

Subcommand modules are imported only when a command runs (or help lists
them), so `bcvk --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from bcvk import __version__

# name → (module, attribute, hidden?)
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "images": ("bcvk.cli.images", "images", False),
    "doctor": ("bcvk.cli.doctor", "doctor", False),
    "completion": ("bcvk.cli.completion", "completion", False),
    "ephemeral": ("bcvk.cli.ephemeral", "ephemeral", False),
    "cache": ("bcvk.cli.cache", "cache", False),
    # The seed's earlier spellings, kept as hidden aliases.
    "run-ephemeral": ("bcvk.cli.ephemeral", "run", True),
    "ssh": ("bcvk.cli.project", "ssh", False),
    "to-disk": ("bcvk.cli.to_disk", "to_disk", False),
    "libvirt": ("bcvk.cli.libvirt", "libvirt", False),
    "pb": ("bcvk.cli.pb", "pb", False),
    "up": ("bcvk.cli.project", "up", False),
    "down": ("bcvk.cli.project", "down", False),
    "status": ("bcvk.cli.project", "status", False),
    "config": ("bcvk.cli.project", "config", False),
    "varlink": ("bcvk.cli.varlink", "varlink", False),
}

HELP = {
    "images": "Find bootc images in podman's store and check whether they boot.",
    "doctor": "Report what this host has for running bootc images as VMs.",
    "completion": "Print a shell completion script (bash, zsh or fish).",
    "ephemeral": "Boot bootc images as throwaway VMs (run, run-ssh, ssh, ps, rm, rm-all).",
    "cache": "List or prune bcvk's per-image cache (kernels, block rootfs images).",
    "to-disk": "Turn a bootc image into a bootable disk image (raw, qcow2, vmdk, vhd, vhdx, ova).",
    "libvirt": "Persistent VMs through libvirt (run, list, ssh, start, stop, rm, upload…).",
    "pb": "podman-bootc drop-in: run, ssh, list, stop, start, rm, inspect, images.",
    "up": "Create and start the VMs of ./bcvk.toml so that they match it.",
    "down": "Stop (or --rm: remove) the VMs of ./bcvk.toml.",
    "status": "Each VM of ./bcvk.toml: state, SSH port, in sync with the file or not.",
    "config": "Show the effective configuration of ./bcvk.toml.",
    "ssh": "SSH into a VM of ./bcvk.toml, or an ephemeral VM by name.",
    "varlink": "Serve upstream's varlink API (images, ephemeral, todisk) on a socket.",
}


class LazyGroup(click.Group):
    """A group whose subcommands live in modules imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str, bool]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        visible = [name for name, (_, _, hidden) in self.lazy.items() if not hidden]
        return sorted({*super().list_commands(ctx), *visible})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module, attr, _ = self.lazy[cmd_name]
            command = getattr(importlib.import_module(module), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help comes from a table so that listing commands imports nothing.
        rows = [(name, HELP.get(name, "")) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings=CONTEXT,
    help="bcvk — boot bootable container (bootc) images as VMs and turn them into disks.",
)
@click.option("--debug", is_flag=True, help="Log every command run and show tracebacks.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines on stderr as text for people or JSON lines for machines.",
)
@click.version_option(__version__, "--version", prog_name="bcvk")
def root(debug: bool, log_format: str) -> None:
    from bcvk import log

    log.setup(debug=debug, log_format=log_format)
