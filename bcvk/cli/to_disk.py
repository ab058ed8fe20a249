"""`bcvk to-disk IMAGE OUTPUT`."""

from __future__ import annotations

import sys

import click

from bcvk.cli import CONTEXT
from bcvk.cli import options as shared
from bcvk.values import Firmware


@click.command("to-disk", context_settings=CONTEXT)
@click.argument("image")
@click.argument("output", type=click.Path(dir_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["raw", "qcow2", "vmdk", "vhd", "vhdx", "ova"]),
    help="Disk format.  [default: from OUTPUT's extension, else raw]",
)
@shared.filesystem_option("Root filesystem.  [default: the image's install config, else ext4]")
@click.option("--disk-size", metavar="SIZE", help="Disk size.  [default: max(2 × image, 4G)]")
@click.option("--root-size", metavar="SIZE", help="Root partition size (M if no unit).")
@click.option("--karg", "kargs", multiple=True, metavar="ARG", help="Kernel argument (repeatable).")
@click.option(
    "--root-ssh-authorized-keys",
    type=click.Path(exists=True, dir_okay=False),
    metavar="FILE",
    help="Public keys to write to root's authorized_keys in the disk.",
)
@click.option(
    "--installer",
    type=click.Choice(["auto", "native", "bootc"]),
    default="auto",
    show_default=True,
    help="native: build the disk here without a VM; bootc: run the image's own "
    "`bootc install to-disk` in a VM; auto: bootc when the image has it.",
)
@shared.firmware_option(
    Firmware.uefi,
    Firmware.bios,
    Firmware.both,
    help_text="Boot firmware the disk supports (native: uefi only).",
)
@click.option(
    "--partition-table",
    type=click.Choice(["gpt", "mbr"]),
    default="gpt",
    show_default=True,
    help="Partition table type.",
)
@click.option("--compress", is_flag=True, help="Compress a qcow2 disk.")
@click.option(
    "--dry-run", is_flag=True, help="Print would-reuse or would-regenerate and change nothing."
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace OUTPUT even if bcvk did not create it (an exact cache hit is still reused).",
)
@click.option(
    "--install-log",
    metavar="FILTER",
    envvar="BOOTC_INSTALL_LOG",
    help="RUST_LOG filter for `bootc install` (bootc installer; env BOOTC_INSTALL_LOG).",
)
@click.option(
    "--target-transport",
    metavar="TRANSPORT",
    help="bootc installer: the transport the installed system updates from (bootc's default: "
    "registry).",
)
@click.option("--composefs-backend", is_flag=True, help="bootc installer: the composefs backend.")
@click.option(
    "--bootloader",
    type=click.Choice(["grub", "systemd", "none"]),
    help="bootc installer: the bootloader bootc installs.",
)
@click.option(
    "--allow-missing-fsverity",
    is_flag=True,
    help="bootc installer: install on a filesystem without fs-verity.",
)
@click.option(
    "--storage-path",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="bootc installer: the host's container storage.  [default: podman's graph root]",
)
@click.option("--memory", metavar="SIZE", help="bootc installer VM's memory.  [default: 4G]")
@click.option("--vcpus", metavar="N", help="bootc installer VM's vCPUs.  [default: host's, ≤ 4]")
@click.option("--itype", metavar="TYPE", help="bootc installer VM's instance type (u1.small…).")
@click.option(
    "--secure-boot-keys",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Sign systemd-boot and the kernel with DIR/db.key (DIR holds PK.crt, KEK.crt, "
    "db.crt and db.key) for Secure Boot with your own keys.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def to_disk(
    image: str,
    output: str,
    fmt: str | None,
    filesystem: str | None,
    disk_size: str | None,
    root_size: str | None,
    kargs: tuple[str, ...],
    root_ssh_authorized_keys: str | None,
    installer: str,
    firmware: str,
    partition_table: str,
    compress: bool,
    dry_run: bool,
    force: bool,
    install_log: str | None,
    target_transport: str | None,
    composefs_backend: bool,
    bootloader: str | None,
    allow_missing_fsverity: bool,
    storage_path: str | None,
    memory: str | None,
    vcpus: str | None,
    itype: str | None,
    secure_boot_keys: str | None,
    as_json: bool,
) -> None:
    """Turn bootc IMAGE into a bootable disk image at OUTPUT.

    The native installer needs no VM, no root and no loop device: the root
    filesystem is built from the image tree, systemd-boot and a Boot Loader
    Specification entry go on the EFI system partition.  An OUTPUT that bcvk
    built from the same image and options is reused; a changed one is rebuilt
    beside it and swapped in only once complete.
    """
    from bcvk import to_disk as core
    from bcvk.cli import output as out

    result = core.build(
        image,
        output,
        format=fmt,
        filesystem=filesystem,
        disk_size=disk_size,
        root_size=root_size,
        kargs=kargs,
        root_ssh_authorized_keys=root_ssh_authorized_keys,
        installer=installer,
        firmware=firmware,
        partition_table=partition_table,
        compress=compress,
        dry_run=dry_run,
        force=force,
        install_log=install_log,
        target_transport=target_transport,
        composefs_backend=composefs_backend,
        bootloader=bootloader,
        allow_missing_fsverity=allow_missing_fsverity,
        storage_path=storage_path,
        installer_memory=memory,
        installer_vcpus=vcpus,
        installer_itype=itype,
        secure_boot_keys=secure_boot_keys,
    )
    if as_json:
        out.emit_json(result.to_json())
    elif dry_run:
        sys.stdout.write(result.action + "\n")
