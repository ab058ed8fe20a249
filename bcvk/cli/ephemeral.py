"""`bcvk ephemeral run | run-ssh | ssh | ps | rm | rm-all` (+ hidden top-level aliases)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from bcvk.cli import CONTEXT, output
from bcvk.cli import options as shared
from bcvk.values import Accel, PullPolicy

if TYPE_CHECKING:
    from bcvk.ephemeral import Options

F = TypeVar("F", bound=Callable[..., Any])

# Options after IMAGE belong to the guest command (`run-ssh IMAGE ls -l`).
PASSTHROUGH = {**CONTEXT, "allow_interspersed_args": False, "ignore_unknown_options": True}


def vm_options(fn: F) -> F:
    """The option set shared by `run` and `run-ssh` (upstream's names)."""
    options = [
        click.option("--name", help="VM name (default: bcvk-<random>); used by `ephemeral ssh`."),
        click.option(
            "--memory", metavar="SIZE", help="Guest RAM: 2G, 1024M, or MiB.  [default: 2G]"
        ),
        click.option("--vcpus", metavar="N", help="Guest vCPUs.  [default: min(host CPUs, 4)]"),
        click.option(
            "--itype",
            metavar="TYPE",
            help="KubeVirt instance type (u1.nano … u1.8xlarge); overrides --memory/--vcpus.",
        ),
        click.option(
            "--karg", "kargs", multiple=True, metavar="ARG", help="Extra kernel argument (repeat)."
        ),
        click.option(
            "-K",
            "--ssh-keygen",
            is_flag=True,
            help="Accepted for compatibility: a fresh ed25519 key is always made.",
        ),
        click.option(
            "--rootfs",
            type=click.Choice(["auto", "virtiofs", "block"]),
            default="auto",
            show_default=True,
            help="How the image reaches the guest: virtiofs (needs virtiofsd) or a cached "
            "read-only ext4 image on virtio-blk; auto prefers virtiofs.",
        ),
        click.option("--console", is_flag=True, help="Show the guest console on this terminal."),
        click.option(
            "--log-dir",
            metavar="[STREAMS=]DIR",
            help="Write console.txt and journal.json to DIR (STREAMS: console,journal).",
        ),
        click.option(
            "--systemd-units",
            metavar="DIR",
            help="Make the unit files in DIR (and its *.wants/, *.requires/ links) active in "
            "the guest from boot.",
        ),
        click.option(
            "--bind",
            "binds",
            multiple=True,
            metavar="HOST[:NAME]",
            help="Share a host directory read-write at /run/virtiofs-mnt-NAME.",
        ),
        click.option(
            "--ro-bind",
            "ro_binds",
            multiple=True,
            metavar="HOST[:NAME]",
            help="Share a host directory read-only at /run/virtiofs-mnt-NAME.",
        ),
        click.option(
            "--bind-storage-ro",
            is_flag=True,
            help="Share this user's container storage read-only at /run/host-container-storage, "
            "as an additional image store for the guest's podman.",
        ),
        click.option(
            "--mount-disk-file",
            "disks",
            multiple=True,
            metavar="FILE[:NAME[:FMT]]",
            help="Attach FILE as /dev/disk/by-id/virtio-NAME (created sparse if missing).",
        ),
        shared.port_option,
        click.option(
            "--network-isolation",
            is_flag=True,
            help="The guest reaches nothing outside the VM (QEMU restrict=on); SSH and -p "
            "forwards still work.",
        ),
        click.option(
            "--cloud-init",
            metavar="PATH",
            help="A cloud-init NoCloud seed for the guest: a directory holding user-data "
            "(meta-data, network-config optional) or a user-data file.",
        ),
        click.option(
            "--cloud-init-empty",
            is_flag=True,
            help="Give cloud-init an empty seed (it stops looking for a datasource).",
        ),
        click.option(
            "--label",
            "labels",
            multiple=True,
            metavar="KEY[=VALUE]",
            help="A label for `ps --label` and `rm-all --label` (repeat).",
        ),
        click.option("--add-swap", metavar="SIZE", help="Give the guest a swap disk of SIZE."),
        click.option(
            "--virtiofsd",
            metavar="PATH",
            help="virtiofsd binary (also $BCVK_VIRTIOFSD, $VIRTIOFSD_BIN).",
        ),
        click.option(
            "--pull",
            type=click.Choice([p.value for p in PullPolicy]),
            default=PullPolicy.missing.value,
            show_default=True,
            help="When to pull IMAGE from its registry.",
        ),
        shared.timeout_option("--ssh-timeout", 240.0, "How long to wait for the guest's sshd."),
        click.option(
            "--accel",
            type=click.Choice([a.value for a in Accel]),
            help="Force an accelerator (also $BCVK_ACCEL); default: KVM only where it works.",
        ),
        click.option(
            "--warm",
            type=click.Choice(["auto", "off", "refresh"]),
            help="Start from a saved, SSH-ready machine: auto restores the snapshot of this "
            "configuration or boots cold and saves one; off always boots cold; refresh "
            "replaces the snapshot (also $BCVK_WARM).  [default: auto]",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _options(image: str, **kw: Any) -> Options:
    from bcvk import ephemeral

    kw.pop("ssh_keygen", None)
    kw.pop("rm", None)
    return ephemeral.make_options(image, **kw)


@click.group(context_settings=CONTEXT)
def ephemeral() -> None:
    """Boot bootc images as throwaway VMs: writes vanish when they stop.

    The image's own kernel boots directly; its root filesystem is served
    read-only (virtiofs, or a cached ext4 image with --rootfs block) under a
    writable tmpfs overlay.  SSH uses a fresh key per VM on 127.0.0.1.

    \b
    Examples:
      bcvk ephemeral run-ssh quay.io/fedora/fedora-bootc:42 -- uname -r
      bcvk ephemeral run -d --name dev --bind ~/src:src IMAGE
      bcvk ephemeral ssh dev
      bcvk ephemeral ps --format json
      bcvk ephemeral rm dev

    \b
    Environment:
      BCVK_ACCEL=kvm|tcg        force an accelerator (like --accel)
      BCVK_VIRTIOFSD, VIRTIOFSD_BIN   virtiofsd binary (like --virtiofsd)
      QEMU_BIN                  QEMU binary (default qemu-system-<arch>)
      BCVK_SSH_KEY_ROUTES       force key injection: smbios,cmdline,cloud-init
      BCVK_WARM=auto|off|refresh     warm start (like --warm)
      BCVK_BOOT_STALL_TIMEOUT=SECONDS   boot again once if the kernel is silent
                                this long before init (default 120; 0: never)
    """


@ephemeral.command(context_settings=CONTEXT)
@click.argument("image")
@vm_options
@click.option("-d", "--detach", is_flag=True, help="Start in the background and print the name.")
@click.option(
    "--rm",
    is_flag=True,
    help="Accepted for compatibility: ephemeral VMs are always removed when they stop.",
)
@click.option(
    "--execute",
    multiple=True,
    metavar="CMD",
    help="Run CMD in the guest after boot (repeat), then power off; exit with its status.",
)
@click.pass_context
def run(ctx: click.Context, /, image: str, **kw: Any) -> None:
    """Boot IMAGE as an ephemeral VM.

    In the foreground the VM runs until it powers off or Ctrl-C; with
    --execute the commands run and the VM powers off; with -d it keeps
    running in the background (`bcvk ephemeral ssh|ps|rm`).
    """
    from bcvk import ephemeral as core

    opts = _options(image, **kw)
    if opts.detach:
        click.echo(core.start(opts).name)
        return
    ctx.exit(core.run_vm(opts))


@ephemeral.command("run-ssh", context_settings=PASSTHROUGH)
@vm_options
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run_ssh(ctx: click.Context, /, image: str, command: tuple[str, ...], **kw: Any) -> None:
    """Boot IMAGE, run COMMAND over SSH (a shell without one), tear the VM down.

    Exits with COMMAND's exit status.  Options go before IMAGE; everything
    after it (or after --) is the command.
    """
    from bcvk import ephemeral as core

    words = list(command)
    if words and words[0] == "--":
        words = words[1:]
    opts = _options(image, **kw)
    ctx.exit(core.run_ssh(opts, words))


@ephemeral.command("ssh", context_settings=PASSTHROUGH)
@shared.timeout_option("--ssh-timeout", 240.0, "How long to wait for sshd.")
@click.argument("name")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def ssh_cmd(ctx: click.Context, name: str, args: tuple[str, ...], ssh_timeout: float) -> None:
    """Connect to VM NAME (leading -x options go to ssh; the rest is a command)."""
    from bcvk import ephemeral as core

    ctx.exit(core.ssh_into(name, args, timeout=ssh_timeout))


@ephemeral.command(context_settings=CONTEXT)
@click.argument("source", metavar="SRC")
@click.argument("dest", metavar="DST")
@click.option("-r", "--recursive", is_flag=True, help="Copy directories recursively.")
@shared.timeout_option("--timeout", 60.0, "How long to wait for the guest's sshd.")
@click.pass_context
def scp(ctx: click.Context, source: str, dest: str, recursive: bool, timeout: float) -> None:
    """Copy files to or from a VM: one of SRC and DST is NAME:PATH (exit status: scp's)."""
    from bcvk import ephemeral as core

    ctx.exit(core.scp(source, dest, recursive=recursive, timeout=timeout))


_label_filter = click.option(
    "--label", metavar="KEY[=VALUE]", help="Only VMs with this label (as given to `run --label`)."
)


@ephemeral.command()
@shared.format_option("table", "json", json_flag=True)
@_label_filter
def ps(fmt: str, label: str | None) -> None:
    """List running ephemeral VMs."""
    from bcvk import ephemeral as core

    vms = core.ps(label=label)
    output.emit_listing(
        fmt,
        vms,
        ["NAME", "IMAGE", "STATE", "SSH", "PID", "ROOTFS", "CREATED"],
        lambda vm: (
            vm.name,
            vm.image,
            vm.state,
            f"127.0.0.1:{vm.ssh_port}",
            vm.pid or "-",
            vm.rootfs,
            output.age(vm.created),
        ),
    )


@ephemeral.command()
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
@click.option(
    "-f", "--force", is_flag=True, help="Kill at once (no ACPI power-down); ignore unknown names."
)
def rm(names: tuple[str, ...], force: bool) -> None:
    """Stop and remove ephemeral VMs."""
    from bcvk import ephemeral as core

    for name in names:
        if core.rm(name, force=force):
            click.echo(name)


@ephemeral.command("rm-all")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@_label_filter
def rm_all(force: bool, label: str | None) -> None:
    """Stop and remove every ephemeral VM (asks first on a terminal)."""
    from bcvk import ephemeral as core
    from bcvk.errors import UsageError
    from bcvk.log import logger

    vms = core.ps(label=label)
    if not vms:
        logger.info("no ephemeral VMs" + (f" with label {label}" if label else ""))
        return
    if not force:
        if not sys.stdin.isatty():
            raise UsageError(
                f"refusing to remove {len(vms)} VM(s) without confirmation",
                hint="pass -f when not on a terminal",
            )
        listing = ", ".join(vm.name for vm in vms)
        if not click.confirm(f"Remove {len(vms)} VM(s): {listing}?", err=True):
            return
    for name in core.rm_all(label=label):
        click.echo(name)
