"""What a disk is made of: its options, the request they resolve to, its result.

``make_options`` turns CLI-shaped values into ``Options`` once; ``Request``
is one build resolved against the image (digest, size, format, cache key);
every installer takes a ``Request`` and returns a ``Result``.  The cache key
lists every input that changes the disk's bytes, and is computed here only.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bcvk.errors import NotFoundError, UsageError
from bcvk.guest import initrd
from bcvk.host import secureboot, ssh
from bcvk.to_disk.layout import LAYOUT_VERSION, Filesystem, PartitionTable, min_disk_size
from bcvk.values import (
    Firmware,
    format_size,
    parse_choice,
    parse_itype,
    parse_karg,
    parse_memory,
    parse_size,
    parse_vcpus,
)  # fmt: skip


class DiskFormat(enum.StrEnum):
    raw = "raw"
    qcow2 = "qcow2"
    vmdk = "vmdk"
    vhd = "vhd"
    vhdx = "vhdx"
    ova = "ova"


class Installer(enum.StrEnum):
    auto = "auto"
    native = "native"
    bootc = "bootc"


class Action(enum.StrEnum):
    reused = "reused"
    created = "created"
    would_reuse = "would-reuse"
    would_regenerate = "would-regenerate"


_EXTENSIONS = {
    ".raw": DiskFormat.raw,
    ".img": DiskFormat.raw,
    ".qcow2": DiskFormat.qcow2,
    ".vmdk": DiskFormat.vmdk,
    ".vhd": DiskFormat.vhd,
    ".vpc": DiskFormat.vhd,
    ".vhdx": DiskFormat.vhdx,
    ".ova": DiskFormat.ova,
}

# The firmware choices a disk can be built for (a VM's firmware may also be uefi-secure).
DISK_FIRMWARE = (Firmware.uefi, Firmware.bios, Firmware.both)


def format_from_path(path: Path) -> DiskFormat:
    """The format OUTPUT's extension names, else raw."""
    return _EXTENSIONS.get(path.suffix.lower(), DiskFormat.raw)


class Bootloader(enum.StrEnum):
    """``bootc install --bootloader``."""

    grub = "grub"
    systemd = "systemd"
    none = "none"


TRANSPORT_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")


@dataclass(frozen=True)
class BootcInstall:
    """Choices passed through to the image's own ``bootc install to-disk``
    (the bootc installer only), under upstream's flag names."""

    target_transport: str | None = None  # --target-transport (bootc's default: registry)
    composefs_backend: bool = False
    bootloader: Bootloader | None = None
    allow_missing_fsverity: bool = False

    def argv(self) -> list[str]:
        args = []
        if self.target_transport is not None:
            args += ["--target-transport", self.target_transport]
        if self.composefs_backend:
            args.append("--composefs-backend")
        if self.bootloader is not None:
            args += ["--bootloader", self.bootloader.value]
        if self.allow_missing_fsverity:
            args.append("--allow-missing-fsverity")
        return args


@dataclass(frozen=True)
class InstallerVm:
    """The bootc installer VM's size (how to run, not what to make)."""

    memory_mib: int | None = None  # None: 4 GiB
    vcpus: int | None = None  # None: the host's, up to 4


@dataclass(frozen=True)
class Options:
    """Every choice that shapes the disk; built by the CLI or ``make_options``."""

    format: DiskFormat | None = None  # None: from OUTPUT's extension
    filesystem: Filesystem | None = None  # None: the image's default, else ext4
    disk_size: int | None = None  # None: max(2 × image size, 4 GiB)
    root_size: int | None = None  # None: the rest of the disk
    kargs: tuple[str, ...] = ()
    root_ssh_authorized_keys: Path | None = None
    installer: Installer = Installer.auto
    firmware: Firmware = Firmware.uefi
    partition_table: PartitionTable = PartitionTable.gpt
    compress: bool = False
    bootc: BootcInstall = BootcInstall()
    secure_boot_keys: secureboot.Keys | None = None  # sign the ESP's EFI binaries
    # bcvk's guest services (the journal to the host) as a second initrd on
    # the ESP: libvirt's base disks.  The native installer only; a UKI has
    # no boot entry to list it in.
    guest_services: bool = False
    # How to run, not what to make: none of these is in the cache key.
    dry_run: bool = False
    force: bool = False
    install_log: str | None = None  # RUST_LOG for `bootc install` (bootc installer only)
    installer_vm: InstallerVm = InstallerVm()
    storage_path: Path | None = None  # the host's container storage (bootc installer)


# Options fields that do not change the disk's bytes (so not in the cache key).
RUN_ONLY = frozenset({"dry_run", "force", "install_log", "installer_vm", "storage_path"})
# Options fields keyed by their resolved value (the format from OUTPUT's
# extension, the size from the image's), which ``cache_key`` takes apart.
RESOLVED = frozenset({"format", "disk_size"})


def make_options(
    *,
    format: DiskFormat | str | None = None,  # noqa: A002 - mirrors the CLI flag
    filesystem: Filesystem | str | None = None,
    disk_size: int | str | None = None,
    root_size: int | str | None = None,
    kargs: Sequence[str] = (),
    root_ssh_authorized_keys: str | os.PathLike[str] | None = None,
    installer: Installer | str = Installer.auto,
    firmware: Firmware | str = Firmware.uefi,
    partition_table: PartitionTable | str = PartitionTable.gpt,
    compress: bool = False,
    dry_run: bool = False,
    force: bool = False,
    install_log: str | None = None,
    target_transport: str | None = None,
    composefs_backend: bool = False,
    bootloader: Bootloader | str | None = None,
    allow_missing_fsverity: bool = False,
    installer_memory: int | str | None = None,
    installer_vcpus: int | str | None = None,
    installer_itype: str | None = None,
    storage_path: str | os.PathLike[str] | None = None,
    secure_boot_keys: str | os.PathLike[str] | None = None,
) -> Options:
    """CLI-shaped values (``"xfs"``, ``"20G"``) → validated ``Options``; raises UsageError."""
    fw = parse_choice(Firmware, firmware, "--firmware")
    if fw not in DISK_FIRMWARE:
        raise UsageError(
            f"invalid --firmware {fw.value!r} for a disk",
            hint="a disk is built for uefi, bios or both; secure boot is the VM's choice",
        )
    return Options(
        format=parse_choice(DiskFormat, format, "--format") if format is not None else None,
        filesystem=parse_choice(Filesystem, filesystem, "--filesystem") if filesystem else None,
        disk_size=_size(disk_size, "--disk-size", ""),
        root_size=_size(root_size, "--root-size", "m"),
        kargs=tuple(parse_karg(k) for k in kargs),
        root_ssh_authorized_keys=Path(root_ssh_authorized_keys)
        if root_ssh_authorized_keys is not None
        else None,
        installer=parse_choice(Installer, installer, "--installer"),
        firmware=fw,
        partition_table=parse_choice(PartitionTable, partition_table, "--partition-table"),
        compress=compress,
        dry_run=dry_run,
        force=force,
        install_log=install_log or None,
        bootc=BootcInstall(
            target_transport=_transport(target_transport),
            composefs_backend=composefs_backend,
            bootloader=parse_choice(Bootloader, bootloader, "--bootloader") if bootloader else None,
            allow_missing_fsverity=allow_missing_fsverity,
        ),
        installer_vm=_installer_vm(installer_memory, installer_vcpus, installer_itype),
        storage_path=Path(storage_path) if storage_path is not None else None,
        secure_boot_keys=secureboot.load_keys(secure_boot_keys)
        if secure_boot_keys is not None
        else None,
    )


def _transport(value: str | None) -> str | None:
    if value is not None and not TRANSPORT_RE.fullmatch(value):
        raise UsageError(
            f"invalid --target-transport {value!r}",
            hint="a containers transport name such as registry, containers-storage or oci",
        )
    return value


def _installer_vm(memory: int | str | None, vcpus: int | str | None,
                  itype: str | None) -> InstallerVm:  # fmt: skip
    if itype is not None:
        cpus, mib = parse_itype(itype)
        return InstallerVm(mib, cpus)
    return InstallerVm(
        parse_memory(memory) if memory is not None else None,
        parse_vcpus(vcpus) if vcpus is not None else None,
    )


def _size(value: int | str | None, what: str, unit: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    return parse_size(value, default_unit=unit, what=what)


def check_install_log(value: str | None) -> None:
    # Only the bootc installer reads it; the native one has --debug instead.
    if value is not None and not re.fullmatch(r"[A-Za-z0-9_:=,.\-]+", value):
        raise UsageError(
            f"invalid --install-log filter {value!r}",
            hint="a RUST_LOG filter such as debug or bootc_lib=trace,info",
        )


def check_firmware(firmware: Firmware, installer: Installer) -> None:
    """Which installer can build a disk for FIRMWARE (libvirt asks the same question).

    ``auto`` passes here: which installer it is depends on the image, so
    ``check_picked_firmware`` asks again once the image has been read.
    """
    if firmware is Firmware.uefi_secure:
        raise UsageError(
            "--firmware uefi-secure needs a signed boot chain, and the disks bcvk builds "
            "boot an unsigned systemd-boot and kernel unless you give it your keys",
            hint="pass --secure-boot-keys DIR (PK.crt, KEK.crt, db.crt, db.key), or use "
            "--firmware uefi (OVMF with secure boot off, the default)",
        )
    if firmware is not Firmware.uefi and installer is Installer.native:
        raise _native_firmware(firmware, "")


def picked_installer(installer: Installer, has_bootc: bool) -> Installer:
    """What ``--installer auto`` means for an image (with or without /usr/bin/bootc)."""
    if installer is Installer.auto:
        return Installer.bootc if has_bootc else Installer.native
    return installer


def check_picked_firmware(
    firmware: Firmware, installer: Installer, has_bootc: bool, image: str
) -> None:
    """``check_firmware`` for the installer INSTALLER turns out to be for IMAGE."""
    picked = picked_installer(installer, has_bootc)
    if firmware in (Firmware.bios, Firmware.both) and picked is Installer.native:
        why = ""
        if installer is Installer.auto:
            why = f", which --installer auto picks for {image} (it has no /usr/bin/bootc)"
        raise _native_firmware(firmware, why)
    check_firmware(firmware, picked)


def _native_firmware(firmware: Firmware, why: str) -> UsageError:
    return UsageError(
        f"--firmware {firmware.value} is not supported by the native installer{why}",
        hint="BIOS boot needs GRUB written into a BIOS boot partition and the MBR gap, "
        "which bcvk cannot do without root and a GRUB in the image; use --firmware uefi "
        "(OVMF for VMs), or an image that contains bootc (its installer writes BIOS boot code)",
    )


def check_disk_size(size: int | None, filesystem: Filesystem | None) -> None:
    """Refuse, before the image is read, a disk that could not hold even an empty root."""
    floor = min_disk_size(0, filesystem or Filesystem.ext4)
    if size is not None and size < floor:
        raise UsageError(
            f"--disk-size {format_size(size)} is too small for any disk "
            f"(at least {format_size(floor)} before the image's own files)",
            hint="use --disk-size 4G or more, or omit it for the default",
        )


def check_native_options(opts: Options) -> None:
    """What only the bootc installer takes (the native installer refuses it)."""
    given = [
        flag for flag, value in (
            ("--target-transport", opts.bootc.target_transport),
            ("--composefs-backend", opts.bootc.composefs_backend),
            ("--bootloader", opts.bootc.bootloader),
            ("--allow-missing-fsverity", opts.bootc.allow_missing_fsverity),
            ("--memory", opts.installer_vm.memory_mib),
            ("--vcpus", opts.installer_vm.vcpus),
            ("--storage-path", opts.storage_path),
        ) if value
    ]  # fmt: skip
    if given:
        raise UsageError(
            f"{', '.join(given)}: for the bootc installer only, and this disk is built natively",
            hint="pass --installer bootc (the image must contain /usr/bin/bootc)",
        )


def check_bootc_options(opts: Options) -> None:
    """What the bootc installer cannot do (checked up front when it is asked for)."""
    if opts.partition_table is not PartitionTable.gpt:
        raise UsageError(
            "--partition-table mbr is not supported by the bootc installer",
            hint="bootc always writes GPT; use --installer native for MBR",
        )
    if opts.secure_boot_keys is not None:
        raise UsageError(
            "--secure-boot-keys: the bootc installer writes its own boot chain, which bcvk "
            "cannot sign",
            hint="use --installer native, or an image whose bootloader your db key signed",
        )


def validate(opts: Options, fmt: DiskFormat) -> None:
    """The checks that need no image: combinations and files named by the options."""
    if opts.compress and fmt is not DiskFormat.qcow2:
        raise UsageError(
            f"--compress applies to qcow2 only (OUTPUT is {fmt.value})",
            hint="vmdk/ova are always compressed (streamOptimized); drop --compress",
        )
    check_firmware(opts.firmware, opts.installer)
    check_install_log(opts.install_log)
    check_disk_size(opts.disk_size, opts.filesystem)
    if opts.installer is Installer.bootc:
        check_bootc_options(opts)
    elif opts.installer is Installer.native:
        check_native_options(opts)
    if opts.storage_path is not None and not opts.storage_path.is_dir():
        raise NotFoundError(
            f"--storage-path {opts.storage_path} is not a directory",
            hint="give podman's graph root (podman info --format '{{.Store.GraphRoot}}')",
        )
    keys = opts.root_ssh_authorized_keys
    if keys is not None:
        if not keys.is_file():
            raise NotFoundError(
                f"--root-ssh-authorized-keys file {keys} does not exist",
                hint="pass a file of public keys, e.g. ~/.ssh/id_ed25519.pub",
            )
        ssh.check_authorized_keys(keys)


# ------------------------------------------------------------------ cache key


def cache_key(
    image_ref: str, image_digest: str, fmt: DiskFormat, disk_size: int, opts: Options
) -> dict[str, object]:
    """Every input that changes the bytes of the disk, as a JSON object.

    Defaults that depend on the image (filesystem, installer) are recorded as
    chosen ("image-default", "auto"): they are functions of the digest.
    """
    keys = None
    if opts.root_ssh_authorized_keys is not None:
        keys = "sha256:" + hashlib.sha256(opts.root_ssh_authorized_keys.read_bytes()).hexdigest()
    return {
        "version": LAYOUT_VERSION,
        "image_digest": image_digest,
        "image_ref": image_ref,
        "format": fmt.value,
        "compress": opts.compress,
        "filesystem": opts.filesystem.value if opts.filesystem else "image-default",
        "disk_size": disk_size,
        "root_size": opts.root_size,
        "firmware": opts.firmware.value,
        "partition_table": opts.partition_table.value,
        "installer": opts.installer.value,
        "kargs": list(opts.kargs),
        "root_ssh_authorized_keys": keys,
        # Only when given, so that the keys of disks built before these existed hold.
        **({"bootc_install": opts.bootc.argv()} if opts.bootc != BootcInstall() else {}),
        **({"guest_services": initrd.digest(disk=True)} if opts.guest_services else {}),
        **(
            {"secure_boot_db": opts.secure_boot_keys.fingerprint()}
            if opts.secure_boot_keys is not None
            else {}
        ),
    }


def cache_hash(key: dict[str, object]) -> str:
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Request:
    """One disk build, resolved: the options against the image and OUTPUT."""

    image: str  # normalized reference
    image_id: str  # what is mounted: a tag that moves mid-build cannot change the disk
    digest: str
    image_size: int
    output: Path  # absolute
    opts: Options
    fmt: DiskFormat
    disk_size: int
    cache_hash: str
    start: float = 0.0  # time.monotonic() when the command began


@dataclass(frozen=True)
class Result:
    path: Path
    action: Action
    cache_hash: str
    image_digest: str
    format: DiskFormat
    filesystem: Filesystem | None = None
    size: int = 0
    seconds: float = 0.0
    warnings: tuple[str, ...] = field(default=())

    @property
    def reused(self) -> bool:
        return self.action is Action.reused

    def to_json(self) -> dict[str, object]:
        return {
            "path": os.fspath(self.path),
            "action": self.action.value,
            "cache_hash": self.cache_hash,
            "image_digest": self.image_digest,
            "format": self.format.value,
            "filesystem": self.filesystem.value if self.filesystem else None,
            "size": self.size,
            "seconds": round(self.seconds, 3),
            "warnings": list(self.warnings),
        }
