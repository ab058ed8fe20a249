"""The native installer: a bootable disk from an image tree, with no VM and no root.

The root filesystem is made from the mounted tree by the filesystem's own
mkfs (``bcvk.to_disk.mkfs``); the EFI system partition is a FAT file filled
with mtools (``bcvk.to_disk.bootloader``); both are laid into a GPT (or MBR)
disk at the offsets ``bcvk.to_disk.layout`` computed, and converted once
(``bcvk.to_disk.assemble``).  Stages, in order: ``read`` the tree, ``plan``
the disk, ``populate`` the root, ``make_esp``, ``assemble``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bcvk import run
from bcvk.errors import BcvkError
from bcvk.guest import initrd
from bcvk.host import podman, secureboot
from bcvk.image import inns
from bcvk.image.facts import TreeFacts, probe
from bcvk.image.scan import TreeScan, scan_json
from bcvk.image.tree import Kernel, resolve
from bcvk.log import logger, step
from bcvk.to_disk import assemble, bootloader, mkfs
from bcvk.to_disk.layout import ESP_MOUNTPOINT, Filesystem, Ids, Layout, compute_layout, fstab
from bcvk.to_disk.options import DiskFormat, Options, Request
from bcvk.to_disk.output import finish
from bcvk.to_disk.treecopy import Extra
from bcvk.values import format_size

# The paths bcvk writes into the root, and so must know the tree's type of.
WRITTEN_PATHS = (
    "/etc", "/etc/fstab", "/etc/machine-id", "/root", "/root/.ssh",
    "/root/.ssh/authorized_keys", "/boot", "/boot/efi", "/.autorelabel",
)  # fmt: skip


@dataclass(frozen=True)
class Located:
    """Where, in the mounted image, the files the ESP needs are (host paths)."""

    kernel: str | None
    initrd: str | None
    systemd_boot: str | None
    existing: dict[str, str]  # WRITTEN_PATHS → "dir" | "other" | "missing"


@dataclass(frozen=True)
class Tree:
    """The mounted image as the disk builder sees it."""

    root: Path
    facts: TreeFacts
    located: Located

    @property
    def kernel(self) -> Kernel:
        return self.facts.kernels[0]


@inns.entry
def read_json(root: str, arch: str) -> dict[str, object]:
    """Facts and located files of the tree at ROOT (through ``inns.call``)."""
    tree = Path(root)
    facts = probe(tree, arch)

    def real(path: str | None) -> str | None:
        found = resolve(tree, path) if path else None
        return os.fspath(found) if found is not None and found.is_file() else None

    kernel = facts.kernels[0] if len(facts.kernels) == 1 else None
    existing = {}
    for path in WRITTEN_PATHS:
        host = tree / path.lstrip("/")
        existing[path] = (
            "missing"
            if not os.path.lexists(host)
            else "dir"
            if host.is_dir() and not host.is_symlink()
            else "other"
        )
    located = {
        "kernel": real(kernel.path) if kernel else None,
        "initrd": real(kernel.initramfs) if kernel else None,
        "systemd_boot": real(f"{bootloader.SYSTEMD_BOOT_DIR}/{bootloader.systemd_boot_name(arch)}"),
        "existing": existing,
    }
    return {"facts": facts.to_json(), "located": located}


def read(root: Path, image: str) -> Tree:
    """Stage 1: what is in the tree, checked to be something bcvk can boot."""
    with step("Reading the image"):
        data = inns.call(read_json, root, platform.machine())
    tree = Tree(root, TreeFacts.from_json(data["facts"]), Located(**data["located"]))
    if problem := tree.facts.kernel_problem():
        raise BcvkError(
            f"image {image} cannot become a disk: {problem}",
            hint=tree.facts.kernel_hint(),
        )
    if tree.located.kernel is None:
        raise BcvkError(
            f"kernel {tree.kernel.path} in image {image} is not a regular file",
            hint="the kernel must be a file in the image itself, not a link out of it",
        )
    if tree.located.existing["/etc"] != "dir":
        raise BcvkError(
            f"image {image} has no /etc directory; it cannot be a bootable OS tree",
            hint="a bootc image is a whole OS: build it FROM a bootc base image",
        )
    return tree


def resolve_filesystem(opts: Options, facts: TreeFacts) -> Filesystem:
    """--filesystem, else what the image's bootc install config asks for, else ext4."""
    if opts.filesystem is not None:
        return opts.filesystem
    if facts.install_filesystem:
        try:
            return Filesystem(facts.install_filesystem)
        except ValueError:
            raise BcvkError(
                f"the image's bootc install config asks for root filesystem "
                f"{facts.install_filesystem!r}, which bcvk cannot build",
                hint="pass --filesystem ext4, xfs or btrfs",
            ) from None
    return Filesystem.ext4


def preflight(filesystem: Filesystem, fmt: DiskFormat) -> None:
    """Fail before any work when a host tool for this disk is missing."""
    tools = (*filesystem.tools, "sfdisk", "mkfs.vfat", "mcopy")
    if fmt is not DiskFormat.raw:
        tools += ("qemu-img",)
    for tool in tools:
        run.require(tool, *run.sbin(tool), why=f"for a {filesystem.value} {fmt.value} disk")


@dataclass
class Plan:
    """Stage 2: what the disk will be, decided before anything is written."""

    filesystem: Filesystem
    layout: Layout
    ids: Ids
    kargs: tuple[str, ...]
    warnings: list[str] = field(default_factory=list)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        logger.warning("%s", text)


def plan(req: Request, tree: Tree) -> Plan:
    facts = tree.facts
    filesystem = resolve_filesystem(req.opts, facts)
    preflight(filesystem, req.fmt)
    if facts.selinux:
        logger.info("SELinux policy found: the disk relabels itself on first boot (/.autorelabel)")
    if filesystem.losses:
        found = TreeScan.from_json(
            inns.call(scan_json, tree.root, ",".join(sorted(filesystem.losses)))
        )
    else:
        # mkfs.ext4 -d keeps everything: no loss to list, and podman's image
        # size is its content size; skip walking the tree.
        found = TreeScan(content_bytes=req.image_size)
    ids = Ids.generate()
    layout = compute_layout(
        req.disk_size,
        content_bytes=found.content_bytes,
        filesystem=filesystem,
        ids=ids,
        root_size=req.opts.root_size,
        table=req.opts.partition_table,
        arch=platform.machine(),
    )
    result = Plan(filesystem, layout, ids, (*facts.image_kargs, *req.opts.kargs))
    if facts.has_bootc:
        result.warn(
            "the image contains bootc but the native installer builds a plain root "
            "filesystem, not an ostree deployment: `bootc upgrade`/`bootc rollback` "
            "will not work in this disk"
        )
    if tree.kernel.kind == "uki" and result.kargs:
        result.warn("the image boots a UKI: its command line is sealed, --karg is not applied")
    if loss := mkfs.loss_warning(filesystem, found.loss):
        result.warn(loss)
    return result


@contextlib.contextmanager
def stage_dir() -> Iterator[Path]:
    """A private directory with a plain name for the files bcvk adds.

    Not beside OUTPUT: debugfs scripts and xfs protofiles name these files,
    and OUTPUT's directory may hold blanks, quotes or line breaks.
    """
    with tempfile.TemporaryDirectory(prefix="bcvk-extras-") as directory:
        yield Path(directory)


def extras(stage: Path, disk: Plan, opts: Options, tree: Tree) -> list[Extra]:
    """The files bcvk adds to the image's tree in the disk's root (staged in STAGE)."""
    out: list[Extra] = []
    existing = tree.located.existing

    def add_file(path: str, content: str | bytes, mode: int) -> None:
        host = stage / path.strip("/").replace("/", "_")
        host.write_bytes(content.encode() if isinstance(content, str) else content)
        out.append(Extra(path, "file", mode, os.fspath(host)))

    add_file("/etc/fstab", fstab(disk.filesystem, disk.ids), 0o644)
    add_file("/etc/machine-id", "", 0o444)
    if existing["/boot"] != "dir":
        out.append(Extra("/boot", "dir", 0o755))
    out.append(Extra(ESP_MOUNTPOINT, "dir", 0o700))
    if opts.root_ssh_authorized_keys is not None:
        keys = opts.root_ssh_authorized_keys.read_bytes()
        if existing["/root"] != "dir":
            out.append(Extra("/root", "dir", 0o700))
        if existing["/root/.ssh"] != "dir":
            out.append(Extra("/root/.ssh", "dir", 0o700))
        add_file("/root/.ssh/authorized_keys", keys, 0o600)
    if tree.facts.selinux:
        add_file("/.autorelabel", "", 0o644)
    return out


def populate(work: Path, disk: Plan, opts: Options, tree: Tree) -> Path:
    """Stage 3: the root filesystem image, from the tree plus bcvk's files."""
    root_img = work / "root.img"
    with open(root_img, "wb") as f:
        f.truncate(disk.layout.root.size)
    size = format_size(disk.layout.root.size)
    step_name = f"Populating the {disk.filesystem.value} root filesystem ({size})"
    with step(step_name), stage_dir() as stage:
        added = extras(stage, disk, opts, tree)
        spec = mkfs.RootSpec(tree.root, disk.ids.root_fs, added, tree.located.existing)
        mkfs.BUILDERS[disk.filesystem](spec, root_img, work)
    return root_img


def make_esp(
    work: Path,
    disk: Plan,
    tree: Tree,
    keys: secureboot.Keys | None = None,
    guest_services: bool = False,
) -> Path:
    """Stage 4: the EFI system partition image: systemd-boot, kernel, entry
    (signed with KEYS' db key when given)."""
    arch = platform.machine()
    located = tree.located
    boot_files = work / "boot-files"
    boot_files.mkdir()
    for src, name in (
        (located.kernel, "kernel"),
        (located.initrd, "initrd"),
        (located.systemd_boot, "systemd-boot.efi"),
    ):
        if src:
            run.run(
                podman.unshare_argv(["cp", "--no-preserve=all", src, os.fspath(boot_files / name)])
            )
    if located.systemd_boot:
        systemd_boot = boot_files / "systemd-boot.efi"
    else:
        host = bootloader.host_systemd_boot(arch)
        if host is None:
            raise BcvkError(
                "systemd-boot is neither in the image nor on this host "
                f"({bootloader.SYSTEMD_BOOT_DIR}/{bootloader.systemd_boot_name(arch)})",
                hint="install it: apt-get install systemd-boot-efi (Debian/Ubuntu) or "
                "dnf install systemd-boot-unsigned (Fedora)",
            )
        logger.info("The image has no systemd-boot; using the host's %s", host)
        systemd_boot = host
    kernel = tree.kernel
    uki = kernel.kind == "uki"
    entry = None
    if guest_services and (uki or not located.initrd):
        logger.info(
            "This disk has no boot entry initrd to add bcvk's guest services to "
            "(a UKI, or no initrd): VMs of it get no --log-dir journal stream"
        )
    # After the image's own initrd only: alone, it would have no /init.
    extra = (
        ((initrd.DISK_ARCHIVE, initrd.disk_archive()),) if guest_services and located.initrd else ()
    )
    if not uki:
        entry = bootloader.make_entry(
            tree.facts.os_release,
            kernel.version,
            bootloader.kernel_cmdline(disk.ids.root_fs, disk.kargs),
            has_initrd=located.initrd is not None,
            extra_initrds=tuple(path for path, _ in extra),
        )
        logger.debug("boot entry: %s", bootloader.describe(entry))
    esp_files = bootloader.EspFiles(
        systemd_boot=systemd_boot,
        kernel=boot_files / "kernel",
        initrd=boot_files / "initrd" if located.initrd else None,
        uki=uki,
        extra_initrds=extra if not uki else (),
    )
    stage = work / "esp"
    stage.mkdir()
    uki_name = f"{kernel.version}.efi"
    bootloader.stage_esp(stage, esp_files, entry, arch, uki_name=uki_name)
    if keys is not None:
        with step("Signing systemd-boot and the kernel with the db key"):
            for binary in bootloader.efi_binaries(stage, entry, arch, uki_name):
                secureboot.sign(keys, binary)
    esp_img = work / "esp.img"
    bootloader.build_esp(esp_img, disk.layout.esp.size, stage, disk.ids.esp_fs)
    shutil.rmtree(stage)
    shutil.rmtree(boot_files)
    return esp_img


def assemble_disk(
    req: Request, work: Path, disk: Plan, esp: Path, root: Path, pretty_name: str
) -> Path:
    """Stage 5: the disk in the requested format, in the work directory."""
    fmt = req.fmt
    dest = work / f"disk.{fmt.value}"
    if fmt is DiskFormat.raw:
        with step("Assembling the disk"):
            assemble.assemble_raw(dest, disk.layout, esp, root)
        return dest
    target = work / "disk.vmdk" if fmt is DiskFormat.ova else dest
    with step(f"Converting to {assemble.QEMU_IMG[fmt][0]}"):
        assemble.convert(work, disk.layout, esp, root, fmt, target, req.opts.compress)
    if fmt is DiskFormat.ova:
        with step("Packing the OVA"):
            assemble.write_ova(
                target, dest, req.output.stem, disk.layout.size, req.opts.firmware, pretty_name
            )
    return dest


def build(req: Request, mount: podman.ImageMount, work: Path, tree: Tree) -> tuple[Plan, int]:
    """Every stage after ``read``; returns the plan and OUTPUT's size."""
    disk = plan(req, tree)
    root = populate(work, disk, req.opts, tree)
    esp = make_esp(work, disk, tree, req.opts.secure_boot_keys, req.opts.guest_services)
    # Nothing reads the image from here on: unmount while the disk converts.
    mount.release()
    pretty = tree.facts.os_release.get("PRETTY_NAME") or "Linux"
    dest = assemble_disk(req, work, disk, esp, root, pretty)
    return disk, finish(dest, req.output, req.cache_hash, req.digest, force=req.opts.force)
