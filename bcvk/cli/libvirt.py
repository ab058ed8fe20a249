"""`bcvk libvirt …`: persistent VMs through the libvirt API."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bcvk.cli import CONTEXT, output
from bcvk.cli import options as shared
from bcvk.values import Firmware

if TYPE_CHECKING:
    from bcvk.libvirt import RunOptions, Vm


_uri = shared.libvirt_uri


@click.group(context_settings=CONTEXT)
@click.option(
    "-c",
    "--connect",
    "uri",
    metavar="URI",
    help="libvirt URI.  [default: $LIBVIRT_DEFAULT_URI, else qemu:///system for root, "
    "qemu:///session otherwise]",
)
@click.pass_context
def libvirt(ctx: click.Context, uri: str | None) -> None:
    """Persistent VMs of bootc images, managed through libvirt.

    The VMs are ordinary libvirt domains (visible in virsh, virt-manager and
    Cockpit); bcvk keeps what it needs in each domain's metadata.
    """
    ctx.obj = {"uri": uri}


def run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options `run` and `create` share (applied bottom-up)."""
    options = [
        click.option("--name", help="Domain name.  [default: from the image, -2, -3… if taken]"),
        click.option(
            "-R", "--replace", is_flag=True, help="Remove an existing bcvk VM of that name first."
        ),
        click.option("--memory", metavar="SIZE", help="Memory (M if no unit).  [default: 4G]"),
        click.option("--cpus", "--vcpus", "vcpus", metavar="N", help="vCPUs.  [default: 2]"),
        click.option("--itype", metavar="TYPE", help="Instance type (u1.small…); sets both."),
        click.option(
            "--disk-size",
            metavar="SIZE",
            default="20G",
            show_default=True,
            help="Disk size; `df /` in the guest shows it.",
        ),
        shared.filesystem_option(),
        click.option("--root-size", metavar="SIZE", help="Root partition size (M if no unit)."),
        click.option("--karg", "kargs", multiple=True, metavar="ARG", help="Kernel argument."),
        shared.port_option,
        click.option(
            "--network",
            default="user",
            show_default=True,
            metavar="user|none",
            help="user: NAT, SSH and -p forwards on 127.0.0.1; none: no NIC at all "
            "(upstream's bridge is refused).",
        ),
        click.option(
            "--bind",
            "binds",
            multiple=True,
            metavar="HOST:GUEST",
            help="Share a host directory read-write, mounted at GUEST.",
        ),
        click.option(
            "--bind-ro",
            "--ro-bind",
            "binds_ro",
            multiple=True,
            metavar="HOST:GUEST",
            help="Share a host directory read-only, mounted at GUEST.",
        ),
        click.option(
            "-v",
            "--volume",
            "volumes",
            multiple=True,
            metavar="HOST:TAG",
            help="Raw virtiofs share; mount it yourself: mount -t virtiofs TAG DIR.",
        ),
        click.option(
            "--bind-storage-ro",
            is_flag=True,
            help="Share this user's podman storage read-only at /run/host-container-storage, "
            "an additional image store for the guest's podman.",
        ),
        click.option(
            "--virtiofsd",
            metavar="PATH",
            help="virtiofsd for the shares.  [default: $BCVK_VIRTIOFSD, $VIRTIOFSD_BIN, PATH, "
            "/usr/libexec]",
        ),
        shared.firmware_option(
            Firmware.uefi,
            Firmware.uefi_secure,
            Firmware.bios,
            extra=("uefi-insecure",),
            help_text="uefi: OVMF with secure boot off (alias uefi-insecure); uefi-secure "
            "needs --secure-boot-keys.",
        ),
        click.option(
            "--secure-boot-keys",
            metavar="DIR",
            help="Secure Boot with your keys: DIR holds PK.crt, KEK.crt, db.crt and db.key; the "
            "disk is signed with db.key and the VM's OVMF trusts only these (implies "
            "--firmware uefi-secure).",
        ),
        click.option(
            "--ssh-key",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Private key to use (FILE.pub beside it).  [default: a new one per VM]",
        ),
        click.option("--disable-tpm", is_flag=True, help="No TPM 2.0 (swtpm) device."),
        click.option("--label", "labels", multiple=True, help="Label for list/rm-all filters."),
        click.option(
            "--transient", is_flag=True, help="A transient domain on the base disk; gone at stop."
        ),
        click.option(
            "--console-log",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Log the serial console to FILE.",
        ),
        click.option(
            "--log-dir",
            metavar="[STREAMS=]DIR",
            help="Write the VM's streams into DIR: console.txt (the serial console) and "
            "journal.json, journal-initrd.json (the guest's journal over virtio-serial, "
            "whether or not SSH works).  STREAMS: console, journal or both.  [default: both]",
        ),
        click.option(
            "--firmware-log",
            is_flag=True,
            help="Add OVMF's debug port (isa-debugcon 0x402), logged to DIR/firmware.txt with "
            "--log-dir, else beside the console log.",
        ),
        shared.timeout_option("--timeout", 300.0, "Seconds to wait for SSH."),
        click.option("--pool", default="default", show_default=True, help="Storage pool."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _run_options(
    ctx: click.Context, kwargs: dict[str, Any], *, start: bool, ssh_wait: bool
) -> RunOptions:
    from bcvk import libvirt as core

    return core.make_run_options(
        _uri(ctx),
        tpm=not kwargs.pop("disable_tpm"),
        start=start,
        ssh_wait=ssh_wait,
        **kwargs,
    )


def _print_vm_created(vm: Vm, started: bool) -> None:

    md = vm.metadata
    ssh = f"bcvk libvirt ssh {vm.name}" + ("" if started else " (after start)")
    output.emit_pairs(
        [
            ("Name", vm.name),
            ("State", vm.state),
            ("Image", md.source_image),
            ("SSH", ssh if md.ssh_port else "- (--network none)"),
            ("SSH port", f"127.0.0.1:{md.ssh_port}" if md.ssh_port else "-"),
            ("Disk", vm.disks[0] if vm.disks else "-"),
        ]
    )


@libvirt.command(context_settings=CONTEXT)
@click.argument("image")
@run_options
@click.option("--ssh", "ssh_", is_flag=True, help="Wait for SSH, then open a session.")
@click.option("--ssh-wait", is_flag=True, help="Wait until SSH works, then return.")
@click.option("--detach", is_flag=True, hidden=True, help="Accepted for upstream compatibility.")
@click.pass_context
def run(ctx: click.Context, /, image: str, ssh_: bool, ssh_wait: bool, **kwargs: Any) -> None:
    """Create and start a persistent VM of bootc IMAGE.

    The first VM of an image builds a base disk in the storage pool (with
    `bcvk to-disk`); later VMs are copy-on-write clones of it.
    """
    from bcvk import libvirt as core
    from bcvk.errors import UsageError

    kwargs.pop("detach", None)
    if ssh_ and ssh_wait:
        raise UsageError(
            "--ssh and --ssh-wait exclude each other",
            hint="--ssh waits and opens a session; --ssh-wait only waits",
        )
    opts = _run_options(ctx, kwargs, start=True, ssh_wait=ssh_ or ssh_wait)
    vm = core.run(image, opts, uri=_uri(ctx))
    if ssh_:
        ctx.exit(core.ssh_interactive(vm.name, uri=_uri(ctx)))
    if ssh_wait:
        sys.stderr.write(f"Ready; use `bcvk libvirt ssh {vm.name}` to connect\n")
    _print_vm_created(vm, True)


@libvirt.command(context_settings=CONTEXT)
@click.argument("image")
@run_options
@click.option("--start", "start_", is_flag=True, help="Start it after defining it.")
@click.pass_context
def create(ctx: click.Context, /, image: str, start_: bool, **kwargs: Any) -> None:
    """Define a VM of bootc IMAGE without starting it (unless --start)."""
    from bcvk import libvirt as core

    opts = _run_options(ctx, kwargs, start=start_, ssh_wait=False)
    vm = core.run(image, opts, uri=_uri(ctx))
    _print_vm_created(vm, start_)


@libvirt.command("list", context_settings=CONTEXT)
@click.argument("domain", required=False)
@click.option("-a", "--all", "all_", is_flag=True, help="Include VMs that are not running.")
@click.option("--label", help="Only VMs with this label.")
@shared.format_option("table", "json")
@click.option(
    "--include-private-key",
    is_flag=True,
    help="JSON: inline each VM's private key as `ssh_private_key`, as upstream bcvk does "
    "(anyone who reads the output can log in to the VM).",
)
@click.pass_context
def list_(ctx: click.Context, domain: str | None, all_: bool, label: str | None, fmt: str,
          include_private_key: bool) -> None:  # fmt: skip
    """List bcvk's VMs (running ones unless --all), or only DOMAIN (in any state)."""
    from bcvk import libvirt as core

    if domain is not None:
        vms = [core.inspect(domain, _uri(ctx))]
    else:
        vms = core.list_vms(_uri(ctx), all_states=all_, label=label)
    if fmt == "json":
        output.emit_json([core.listing_json(vm, private_key=include_private_key) for vm in vms])
        return
    rows = []
    for vm in vms:
        md = vm.metadata
        port = f"127.0.0.1:{md.ssh_port}" if md.ssh_port else "-"
        memory = f"{vm.memory_mib or md.memory_mb}M"
        rows.append(
            (vm.name, md.source_image, vm.state, memory, vm.vcpus, port, ",".join(md.labels) or "-")
        )
    output.emit_table(["NAME", "IMAGE", "STATUS", "MEMORY", "CPUS", "SSH", "LABELS"], rows)


@libvirt.command(context_settings={**CONTEXT, "ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@shared.timeout_option("--timeout", 60.0, "Seconds to wait for SSH.")
@click.option("--user", help="Log in as USER.  [default: the VM's, root]")
@click.option(
    "--extra-options", "extra", multiple=True, metavar="KEY=VALUE", help="An ssh -o option."
)
@click.option("--strict-host-keys", is_flag=True, help="Check the host key against known_hosts.")
@click.option("--log-level", metavar="LEVEL", help="ssh's LogLevel.  [default: ERROR]")
@click.pass_context
def ssh(ctx: click.Context, name: str, command: tuple[str, ...], timeout: float,
        user: str | None, extra: tuple[str, ...], strict_host_keys: bool,
        log_level: str | None) -> None:  # fmt: skip
    """Open a shell in VM NAME, or run COMMAND there (`-- CMD…`); exits with its status."""
    from bcvk import libvirt as core
    from bcvk.host import ssh as host_ssh
    from bcvk.values import validate_user

    options = host_ssh.user_options(extra, strict_host_keys=strict_host_keys, log_level=log_level)
    if user is not None:
        validate_user(user)
    uri = _uri(ctx)
    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    if not args or sys.stdin.isatty():
        ctx.exit(
            core.ssh_interactive(name, args, uri=uri, timeout=timeout, user=user, options=options)
        )
    result = core.ssh_command(
        name, args, uri=uri, capture=False, timeout=timeout, user=user, options=options
    )
    ctx.exit(result.returncode)


@libvirt.command(context_settings=CONTEXT)
@click.argument("source", metavar="SRC")
@click.argument("dest", metavar="DST")
@click.option("-r", "--recursive", is_flag=True, help="Copy directories recursively.")
@click.option("--user", help="Log in as USER (default: the VM's, usually root).")
@shared.timeout_option("--timeout", 60.0, "Seconds to wait for SSH.")
@click.pass_context
def scp(ctx: click.Context, source: str, dest: str, recursive: bool, user: str | None,
        timeout: float) -> None:  # fmt: skip
    """Copy files to or from a VM: one of SRC and DST is DOMAIN:PATH (exit status: scp's)."""
    from bcvk import libvirt as core
    from bcvk.values import validate_user

    if user is not None:
        validate_user(user)
    ctx.exit(core.scp(source, dest, uri=_uri(ctx), recursive=recursive, timeout=timeout, user=user))


@libvirt.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("--ssh", "ssh_", is_flag=True, help="Wait for SSH, then open a session.")
@click.option("--ssh-wait", is_flag=True, help="Wait until SSH works, then return.")
@shared.timeout_option("--timeout", 300.0, "Seconds to wait for SSH.")
@click.pass_context
def start(ctx: click.Context, name: str, ssh_: bool, ssh_wait: bool, timeout: float) -> None:
    """Start VM NAME."""
    from bcvk import libvirt as core

    core.start(name, uri=_uri(ctx), ssh_wait=ssh_ or ssh_wait, timeout=timeout)
    if ssh_:
        ctx.exit(core.ssh_interactive(name, uri=_uri(ctx)))


@libvirt.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("-f", "--force", is_flag=True, help="Power off at once instead of shutting down.")
@shared.timeout_option("--timeout", 60.0, "Seconds to wait for the shutdown.")
@click.pass_context
def stop(ctx: click.Context, name: str, force: bool, timeout: float) -> None:
    """Shut VM NAME down (forced off if it does not stop within --timeout)."""
    from bcvk import libvirt as core

    core.stop(name, uri=_uri(ctx), force=force, timeout=timeout)


def _confirm(question: str, force: bool) -> None:
    """Ask on a terminal; elsewhere (scripts, CI) only -f removes anything."""
    from bcvk.errors import UsageError

    if force:
        return
    if not sys.stdin.isatty():
        raise UsageError(
            f"refusing without confirmation: {question.rstrip('?')}",
            hint="pass -f when not on a terminal",
        )
    if not click.confirm(question, default=False, err=True):
        raise click.exceptions.Exit(1)


def stop_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--stop", "stop_", is_flag=True, help="Stop running VMs first (-f implies it)."
    )(fn)


@libvirt.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("-f", "--force", is_flag=True, help="No confirmation; stop it if running.")
@stop_option
@click.pass_context
def rm(ctx: click.Context, name: str, force: bool, stop_: bool) -> None:
    """Remove VM NAME with its disk and generated SSH key (bcvk's VMs only)."""
    from bcvk import libvirt as core

    # Unknown, foreign or copied domains fail before asking; a running one
    # without -f or --stop fails in rm, with the hint to pass one.
    if not force and (stop_ or not core.inspect(name, _uri(ctx)).running):
        _confirm(f"Remove VM {name} and its disk?", force)
    core.rm(name, uri=_uri(ctx), force=force or stop_)


@libvirt.command("rm-all", context_settings=CONTEXT)
@click.option("-f", "--force", is_flag=True, help="No confirmation; stop running VMs too.")
@stop_option
@click.option("--label", help="Only VMs with this label.")
@click.pass_context
def rm_all(ctx: click.Context, force: bool, stop_: bool, label: str | None) -> None:
    """Remove every bcvk VM (with --label: those with that label)."""
    from bcvk import libvirt as core
    from bcvk.log import logger

    vms = core.list_vms(_uri(ctx), all_states=True, label=label)
    if not vms:
        logger.info("No bcvk VMs to remove")
        return
    _confirm(f"Remove {len(vms)} VM(s): {', '.join(v.name for v in vms)}?", force)
    removed, skipped = core.rm_all(uri=_uri(ctx), force=force or stop_, label=label)
    for name in removed:
        logger.info("Removed %s", name)
    for name in skipped:
        logger.warning("Skipped running VM %s (pass --stop or -f to stop and remove it)", name)


@libvirt.command(context_settings=CONTEXT)
@click.argument("name")
@shared.format_option("yaml", "json", "xml")
@click.pass_context
def inspect(ctx: click.Context, name: str, fmt: str) -> None:
    """Show what bcvk knows about VM NAME (xml: the libvirt domain XML)."""
    from bcvk import libvirt as core

    if fmt == "xml":
        sys.stdout.write(core.domain_xml(name, _uri(ctx)))
        return
    data = core.inspect(name, _uri(ctx)).details()
    output.emit_data(fmt, data)


@libvirt.command(context_settings=CONTEXT)
@shared.format_option("yaml", "json")
@click.pass_context
def status(ctx: click.Context, fmt: str) -> None:
    """libvirt's version, the features bcvk relies on, and VM counts."""
    from bcvk import libvirt as core

    data = core.status(_uri(ctx))
    output.emit_data(fmt, data)


def _connect_after_verb(ctx: click.Context, _: click.Parameter, value: str | None) -> None:
    """`bcvk libvirt VERB -c URI` as upstream: the same URI as before the verb."""
    from bcvk.errors import UsageError

    if value is None:
        return
    obj = ctx.ensure_object(dict)  # the libvirt group's, unless only parsing
    if obj.get("uri") not in (None, value):
        raise UsageError(f"two libvirt URIs: {obj['uri']!r} and {value!r}", hint="give -c once")
    obj["uri"] = value


def _add_connect(command: click.Command) -> None:
    command.params.append(
        click.Option(
            ["-c", "--connect"],
            metavar="URI",
            expose_value=False,
            callback=_connect_after_verb,
            help="libvirt URI (as `bcvk libvirt -c URI`).",
        )
    )
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _add_connect(sub)


from bcvk.cli import libvirt_disks  # noqa: E402 - after the group, which it joins

for _command in libvirt_disks.COMMANDS:
    libvirt.add_command(_command)
for _command in libvirt.commands.values():
    _add_connect(_command)
