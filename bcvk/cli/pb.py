"""`bcvk pb …` and the `podman-bootc` entry point: podman-bootc's CLI on bcvk."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from bcvk.cli import CONTEXT, options, output
from bcvk.cli.completion import completion

LEVELS = ("debug", "info", "warn", "warning", "error", "fatal", "panic")
PASSTHROUGH = {**CONTEXT, "allow_interspersed_args": False}


def _uri(ctx: click.Context) -> str | None:
    obj = ctx.find_object(dict)
    value = obj.get("pb_uri") if obj else None
    return value if isinstance(value, str) else None


def _set_level(level: str) -> None:
    import logging

    from bcvk import log

    mapping = {
        "debug": logging.DEBUG,
        "info": logging.INFO,
        "warn": logging.WARNING,
        "warning": logging.WARNING,
        "error": logging.ERROR,
        "fatal": logging.CRITICAL,
        "panic": logging.CRITICAL,
    }
    if level == "debug":
        log.setup(debug=True)
    log.logger.setLevel(mapping[level])


@click.group(context_settings=CONTEXT)
@click.option(
    "--log-level",
    type=click.Choice(LEVELS, case_sensitive=False),
    help="Log level on stderr.  [default: warn as podman-bootc, info under bcvk]",
)
@click.option(
    "-c",
    "--connect",
    "uri",
    metavar="URI",
    help="libvirt URI.  [default: qemu:///system for root, qemu:///session otherwise]",
)
@click.pass_context
def pb(ctx: click.Context, log_level: str | None, uri: str | None) -> None:
    """podman-bootc's commands: run bootc images as VMs (drop-in for podman-bootc).

    \b
    Without --name there is one VM per image: its ID is the image ID's first
    12 hex digits.  Commands take an ID, a unique ID prefix or a name.
    No podman machine is needed: VMs are libvirt domains of the host.
    """
    if ctx.parent is None:  # the podman-bootc entry point: no bcvk root set it up
        from bcvk import log

        log.setup()
        _set_level(log_level or "warn")
    elif log_level:
        _set_level(log_level)
    ctx.obj = {**(ctx.obj or {}), "pb_uri": uri}


def _command(args: tuple[str, ...]) -> list[str]:
    command = list(args)
    if command and command[0] == "--":
        command = command[1:]
    return command


@pb.command(context_settings=PASSTHROUGH)
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("-u", "--user", default="root", show_default=True, help="User for SSH.")
@click.option(
    "--cloudinit",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Attach a cloud-init NoCloud seed ISO built from DIR (needs DIR/user-data).",
)
@options.filesystem_option("Root filesystem.  [default: the image's choice]")
@click.option("-B", "--background", is_flag=True, help="Return once the VM is ready.")
@click.option("--rm", "rm_", is_flag=True, help="Remove the VM when the session ends.")
@click.option("--quiet", is_flag=True, help="Do not show the boot console.")
@click.option("--root-size-max", metavar="SIZE", help="Maximum root partition size (M/G/T).")
@click.option(
    "--disk-size",
    metavar="SIZE",
    help="Disk size (M/G/T).  [default: max(2 x image size, 10G)]",
)
@click.option("--name", help="Create an additional VM of the image with this name.")
@click.option("--memory", metavar="SIZE", default="2048", show_default=True, help="MiB if no unit.")
@click.option("--cpus", metavar="N", default="2", show_default=True, help="vCPUs.")
@options.port_option
@click.option(
    "-v",
    "--volume",
    "volumes",
    multiple=True,
    metavar="HOST:GUEST",
    help="Share a host directory, mounted read-write at GUEST (repeatable).",
)
@click.option(
    "--ssh-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Private key (FILE.pub beside it).  [default: a new one per VM]",
)
@options.timeout_option("--timeout", 300.0, "Seconds to wait for SSH.")
@click.pass_context
def run(ctx: click.Context, /, image: str, command: tuple[str, ...], **kw: Any) -> None:
    """Run a VM of IMAGE (or an existing VM's ID) and open SSH, or run COMMAND.

    \b
    The image is pulled when missing; its disk is built once per set of disk
    inputs.  The VM keeps running after the session unless --rm or a COMMAND
    was given; then the exit status is COMMAND's.
    """
    from bcvk import pb as core
    from bcvk.errors import UsageError

    if kw["rm_"] and kw["background"]:
        raise UsageError(
            "--rm cannot be combined with -B/--background",
            hint="a background VM has no session whose end could remove it",
        )
    rm, background = kw.pop("rm_"), kw.pop("background")
    opts = core.make_run_options(_uri(ctx), quiet=kw.pop("quiet") or not sys.stderr.isatty(), **kw)
    vm, status = core.run_session(
        image,
        opts,
        _command(command),
        rm=rm,
        background=background,
        uri=_uri(ctx),
    )
    if background:
        sys.stdout.write(vm.id + "\n")
    ctx.exit(status)


class _SshCommand(click.Command):
    """`ssh [ID] [-- CMD…]`: a leading `--` means "no ID" (click would drop it)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        i = 0
        while i < len(args) and args[i].startswith("-") and args[i] != "--":
            takes_value = args[i] in ("-u", "--user")
            i += 2 if takes_value else 1
        if i < len(args) and args[i] == "--":
            args = [*args[:i], "", *args[i + 1 :]]  # an empty ID: the latest VM
        return super().parse_args(ctx, args)


@pb.command(cls=_SshCommand, context_settings=PASSTHROUGH)
@click.argument("vm_id", metavar="[ID]", required=False)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("-u", "--user", help="User to log in as.  [default: the one `run -u` chose]")
@click.pass_context
def ssh(ctx: click.Context, vm_id: str | None, command: tuple[str, ...], user: str | None) -> None:
    """Open a shell in VM ID (the latest VM without ID), or run COMMAND (`-- CMD…`)."""
    from bcvk import pb as core

    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    ctx.exit(core.ssh_session(vm_id or None, args, user=user, uri=_uri(ctx)))


@pb.command("list", context_settings=CONTEXT)
@options.format_option("table", "json")
@click.pass_context
def list_(ctx: click.Context, fmt: str) -> None:
    """List podman-bootc VMs (read from libvirt)."""
    from bcvk import pb as core
    from bcvk.values import format_size

    vms = core.list_vms(_uri(ctx))
    output.emit_listing(
        fmt,
        vms,
        ["ID", "REPO", "SIZE", "CREATED", "RUNNING", "SSH PORT", "NAME"],
        lambda vm: (
            vm.id,
            vm.image,
            format_size(vm.info.disk_size),
            output.age(vm.created) if vm.created else "-",
            "true" if vm.running else "false",
            vm.ssh_port or "-",
            vm.name,
        ),
    )


@pb.command(context_settings=CONTEXT)
@click.argument("vm_id", metavar="ID")
@click.pass_context
def stop(ctx: click.Context, vm_id: str) -> None:
    """Shut VM ID down; its domain and disk stay (`pb start` resumes it)."""
    from bcvk import pb as core

    core.stop(vm_id, uri=_uri(ctx))


@pb.command(context_settings=CONTEXT)
@click.argument("vm_id", metavar="ID")
@click.option("--no-wait", is_flag=True, help="Return without waiting for SSH.")
@click.option("--quiet", is_flag=True, help="Do not show the boot console.")
@options.timeout_option("--timeout", 300.0, "Seconds to wait for SSH.")
@click.pass_context
def start(ctx: click.Context, vm_id: str, no_wait: bool, quiet: bool, timeout: float) -> None:
    """Start stopped VM ID (and wait until SSH works)."""
    from bcvk import pb as core

    core.start(
        vm_id,
        uri=_uri(ctx),
        wait=not no_wait,
        quiet=quiet or not sys.stderr.isatty(),
        timeout=timeout,
    )


@pb.command(context_settings=CONTEXT)
@click.argument("vm_id", metavar="[ID]", required=False)
@click.option("--all", "all_", is_flag=True, help="Remove all VMs that are not running.")
@click.option("-f", "--force", is_flag=True, help="Also stop and remove running VMs.")
@click.pass_context
def rm(ctx: click.Context, vm_id: str | None, all_: bool, force: bool) -> None:
    """Remove VM ID with its disk; never one with an open SSH session."""
    from bcvk import pb as core
    from bcvk.errors import UsageError

    if all_ == (vm_id is not None):
        raise UsageError("give either an ID or --all", hint="bcvk pb rm ID  |  bcvk pb rm --all")
    if all_:
        core.rm_all(force=force, uri=_uri(ctx))
        return
    assert vm_id is not None
    core.rm(vm_id, force=force, uri=_uri(ctx))


# podman-bootc's alias; hidden so that help lists the command once.
pb.add_command(
    click.Command(
        "remove",
        params=rm.params,
        callback=rm.callback,
        hidden=True,
        help=rm.help,
        context_settings=CONTEXT,
    )
)


@pb.command(context_settings=CONTEXT)
@click.argument("vm_id", metavar="ID")
@options.format_option("json", "yaml")
@click.pass_context
def inspect(ctx: click.Context, vm_id: str, fmt: str) -> None:
    """Show what is known about VM ID."""
    from bcvk import pb as core

    data = core.inspect(vm_id, _uri(ctx)).to_json()
    output.emit_data(fmt, data)


@pb.command(context_settings=CONTEXT)
@options.format_option("table", "json")
def images(fmt: str) -> None:
    """List bootc images (label containers.bootc=1) in podman's store."""
    from bcvk.cli.images import show_bootc_images

    show_bootc_images(fmt)


pb.add_command(completion)
