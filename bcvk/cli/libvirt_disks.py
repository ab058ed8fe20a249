"""`bcvk libvirt` verbs of storage pools and firmware: upload, to-base-disk,
list-volumes, base-disks, print-firmware (added to the group in cli/libvirt.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from bcvk.cli import CONTEXT, output
from bcvk.cli import options as shared


def install_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The to-disk choices that shape a base disk (`upload`, `to-base-disk`)."""
    for option in reversed(
        [
            click.option("--disk-size", metavar="SIZE", default="20G", show_default=True),
            shared.filesystem_option(),
            click.option("--root-size", metavar="SIZE", help="Root partition size (M if no unit)."),
            click.option("--karg", "kargs", multiple=True, metavar="ARG", help="Kernel argument."),
        ]
    ):
        fn = option(fn)
    return fn


def _sizes(disk_size: str, root_size: str | None) -> tuple[int, int | None]:
    """--disk-size and --root-size in bytes."""
    from bcvk.values import parse_size

    disk = parse_size(disk_size, what="--disk-size")
    return disk, parse_size(root_size, default_unit="m", what="--root-size") if root_size else None


@click.command(context_settings=CONTEXT)
@click.argument("image")
@click.option("--pool", default="default", show_default=True, help="Storage pool.")
@click.option("--volume-name", help="[default: bootc-<image>-<digest12>.qcow2]")
@install_options
@click.option("--replace", is_flag=True, help="Overwrite an existing volume of that name.")
@click.pass_context
def upload(
    ctx: click.Context,
    image: str,
    pool: str,
    volume_name: str | None,
    disk_size: str,
    filesystem: str | None,
    root_size: str | None,
    kargs: tuple[str, ...],
    replace: bool,
) -> None:
    """Build IMAGE's disk and stream it into a storage pool (works for remote URIs)."""
    from bcvk import libvirt as core

    disk, root = _sizes(disk_size, root_size)
    path = core.upload(
        image,
        uri=shared.libvirt_uri(ctx),
        pool=pool,
        volume_name=volume_name,
        disk_size=disk,
        filesystem=filesystem,
        root_size=root,
        kargs=kargs,
        replace=replace,
    )
    sys.stdout.write(path + "\n")


@click.command("to-base-disk", context_settings=CONTEXT)
@click.argument("image")
@click.option("--pool", default="default", show_default=True, help="Storage pool.")
@install_options
@click.pass_context
def to_base_disk(ctx: click.Context, image: str, pool: str, disk_size: str,
                 filesystem: str | None, root_size: str | None,
                 kargs: tuple[str, ...]) -> None:  # fmt: skip
    """Build IMAGE's base disk in the pool now (or find it cached), as `run` would.

    Later `run`s with the same install options clone it at once.
    """
    from bcvk import libvirt as core

    disk, root = _sizes(disk_size, root_size)
    base = core.to_base_disk(image, uri=shared.libvirt_uri(ctx), pool=pool, disk_size=disk,
                             filesystem=filesystem, root_size=root, kargs=kargs)  # fmt: skip
    what = "Using cached base disk" if base.reused else "Created base disk"
    sys.stdout.write(f"{what}: {base.path}\n")


@click.command("list-volumes", context_settings=CONTEXT)
@click.option("--pool", default="default", show_default=True, help="Storage pool.")
@click.option("--json", "as_json", is_flag=True, help="JSON (as --format json).")
@shared.format_option("table", "json")
@click.option("--detailed", is_flag=True, help="Table: format, backing file and path too.")
@click.option("--source-image", metavar="IMAGE", help="Only volumes of VMs of IMAGE.")
@click.option("--all", "all_", is_flag=True, help="Every volume in the pool, not only bcvk's.")
@click.pass_context
def list_volumes(ctx: click.Context, pool: str, as_json: bool, fmt: str, detailed: bool,
                 source_image: str | None, all_: bool) -> None:  # fmt: skip
    """Base disks and VM disks in a storage pool, with the VMs that use them."""
    from bcvk import libvirt as core
    from bcvk.values import format_size

    rows = core.list_volumes(
        shared.libvirt_uri(ctx), pool, all_volumes=all_, source_image=source_image
    )
    if as_json or fmt == "json":
        output.emit_json([r.to_json() for r in rows])
        return
    headers = ["NAME", "KIND", "SIZE", "VIRTUAL", "VMS", "IMAGE"]
    if detailed:
        headers += ["FORMAT", "BACKING", "PATH"]
    table = []
    for r in rows:
        row: list[object] = [
            r.name, r.kind, format_size(r.allocation if False else r.size),
            format_size(r.virtual_size), ",".join(r.vms) or "-", ",".join(r.images) or "-",
        ]  # fmt: skip
        if detailed:
            row += [r.format, r.backing or "-", r.path]
        table.append(tuple(row))
    output.emit_table(headers, table)


@click.command("print-firmware", context_settings=CONTEXT)
@shared.format_option("yaml", "json")
def print_firmware(fmt: str) -> None:
    """The UEFI firmware bcvk boots VMs with, and the host's QEMU firmware descriptors."""
    import platform

    from bcvk.host import firmware

    ovmf = firmware.find_ovmf()
    arch = platform.machine()
    output.emit_data(
        fmt,
        {
            "architecture": arch,
            "uefi": {"code": str(ovmf.code), "vars": str(ovmf.vars)} if ovmf else None,
            "descriptors": [
                d.to_json()
                for d in firmware.descriptors()
                if not d.architectures or arch in d.architectures
            ],
        },
    )


@click.group("base-disks", context_settings=CONTEXT)
def base_disks() -> None:
    """Base disks in the pool that VMs are cloned from."""


@base_disks.command("list", context_settings=CONTEXT)
@click.option("--pool", default="default", show_default=True)
@shared.format_option("table", "json")
@click.pass_context
def base_disks_list(ctx: click.Context, pool: str, fmt: str) -> None:
    """List base disks with how many VM disks use each."""
    from bcvk import libvirt as core
    from bcvk.values import format_size

    rows = core.base_disks(shared.libvirt_uri(ctx), pool)
    if fmt == "json":
        output.emit_json([r.to_json() for r in rows])
        return
    output.emit_table(
        ["NAME", "SIZE", "VIRTUAL", "REFS", "CREATED", "IMAGE DIGEST"],
        [
            (
                r.name,
                format_size(r.allocation),
                format_size(r.capacity),
                len(r.references),
                output.age(r.mtime) if r.mtime else "-",
                (r.image_digest or "-")[:19],
            )
            for r in rows
        ],
    )


@base_disks.command("prune", context_settings=CONTEXT)
@click.option("--pool", default="default", show_default=True)
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
@click.pass_context
def base_disks_prune(ctx: click.Context, pool: str, dry_run: bool) -> None:
    """Delete base disks no VM disk references."""
    from bcvk import libvirt as core

    for base in core.prune_base_disks(shared.libvirt_uri(ctx), pool, dry_run=dry_run):
        sys.stdout.write(("would delete " if dry_run else "deleted ") + base.name + "\n")


COMMANDS = (upload, to_base_disk, list_volumes, print_firmware, base_disks)
