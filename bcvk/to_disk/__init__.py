"""`bcvk to-disk`: a bootable disk image from a bootc container image.

The native installer needs no VM, no loop device, no mount and no root: the
root filesystem is made from the image tree by the filesystem's own mkfs,
the EFI system partition is a FAT file filled with mtools, and both are laid
into a GPT disk at the offsets ``bcvk.to_disk.layout`` computed.  Everything is built
in a hidden work directory beside OUTPUT and renamed into place at the very
end, so an interrupted or failed run never leaves a partial OUTPUT.

Python API::

    from bcvk import to_disk
    result = to_disk.build("localhost/my-image:latest", "out.qcow2", kargs=["console=ttyS0"])
"""

from __future__ import annotations

import contextlib
import enum
import errno
import glob
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bcvk import __version__, run
from bcvk.errors import BcvkError, CommandError, NotFoundError, UsageError
from bcvk.host import podman
from bcvk.log import logger, step
from bcvk.to_disk.layout import (
    ESP_MOUNTPOINT,
    Filesystem,
    Firmware,
    Ids,
    Layout,
    PartitionTable,
    compute_layout,
    default_disk_size,
    fstab,
    sfdisk_script,
)
from bcvk.to_disk.layout import LAYOUT_VERSION as LAYOUT_VERSION
from bcvk.values import format_size, parse_size

if TYPE_CHECKING:
    import tarfile

    from bcvk.image import scan as populate

XATTR_HASH = "user.bootc.cache_hash"
XATTR_DIGEST = "user.bootc.image_digest"
XATTR_CREATOR = "user.bcvk.created_by"


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

# qemu-img output driver and options per format
_QEMU_IMG: dict[DiskFormat, tuple[str, tuple[str, ...]]] = {
    DiskFormat.qcow2: ("qcow2", ()),
    DiskFormat.vmdk: ("vmdk", ("-o", "subformat=streamOptimized")),
    DiskFormat.vhd: ("vpc", ("-o", "subformat=dynamic,force_size=on")),
    DiskFormat.vhdx: ("vhdx", ()),
    DiskFormat.ova: ("vmdk", ("-o", "subformat=streamOptimized")),
}


def format_from_path(path: Path) -> DiskFormat:
    """The format OUTPUT's extension names, else raw."""
    return _EXTENSIONS.get(path.suffix.lower(), DiskFormat.raw)


def _enum(kind: type[enum.StrEnum], value: object, what: str) -> Any:
    try:
        return kind(str(value))
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise UsageError(f"unknown {what} {value!r}", hint=f"choose one of: {choices}") from None


def _size(value: int | str | None, what: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    return parse_size(value, default_unit="m" if what == "--root-size" else "", what=what)


@dataclass(frozen=True)
class Options:
    """Every choice that shapes the disk; built by the CLI or ``build()``."""

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
    dry_run: bool = False
    force: bool = False
    # RUST_LOG for `bootc install` (bootc installer only); logging, so not in the cache key.
    install_log: str | None = None


@dataclass(frozen=True)
class Result:
    path: Path
    action: str  # "reused", "created", "would-reuse", "would-regenerate"
    cache_hash: str
    image_digest: str
    format: DiskFormat
    filesystem: Filesystem | None = None
    size: int = 0
    seconds: float = 0.0
    warnings: tuple[str, ...] = ()

    @property
    def reused(self) -> bool:
        return self.action == "reused"

    def to_json(self) -> dict[str, object]:
        return {
            "path": os.fspath(self.path),
            "action": self.action,
            "cache_hash": self.cache_hash,
            "image_digest": self.image_digest,
            "format": self.format.value,
            "filesystem": self.filesystem.value if self.filesystem else None,
            "size": self.size,
            "seconds": round(self.seconds, 3),
            "warnings": list(self.warnings),
        }


# ------------------------------------------------------------------ cache


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
    }


def cache_hash(key: dict[str, object]) -> str:
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def read_xattr(path: Path, name: str) -> str | None:
    try:
        return os.getxattr(path, name).decode(errors="replace")
    except OSError:
        return None


def created_by_bcvk(path: Path) -> bool:
    return read_xattr(path, XATTR_HASH) is not None or read_xattr(path, XATTR_CREATOR) is not None


def xattrs_supported(directory: Path) -> str | None:
    """None when DIRECTORY's filesystem takes user xattrs, else why not."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".bcvk-xattr-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        os.setxattr(fd, "user.bcvk.probe", b"1")
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
        os.unlink(probe)
    return None


# ------------------------------------------------------------------ helpers


def normalize_reference(image: str) -> str:
    for prefix in ("containers-storage:", "docker://"):
        if image.startswith(prefix):
            image = image[len(prefix) :]
    return podman.validate_reference(image)


def host_arch() -> str:
    return platform.machine()


def check_output_path(output: Path) -> None:
    parent = output.parent
    if not parent.is_dir():
        raise NotFoundError(
            f"output directory {parent} does not exist",
            hint=f"create it first (mkdir -p {parent}) or choose another OUTPUT",
        )
    if output.is_dir():
        raise UsageError(f"OUTPUT {output} is a directory", hint="give a file name, e.g. out.qcow2")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BcvkError(
            f"output directory {parent} is not writable",
            hint="choose a directory you can write to",
        )


def copy_sparse(src: Path, dst: Path, offset: int) -> None:
    """Copy SRC into DST at OFFSET, skipping holes (dst stays sparse)."""
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # only a hole remains
                raise
            hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
            remaining = hole - data
            src_off, dst_off = data, offset + data
            while remaining > 0:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), remaining, src_off, dst_off)
                if n == 0:
                    raise OSError(errno.EIO, f"short copy from {src}")
                remaining -= n
                src_off += n
                dst_off += n
            pos = hole


def _no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, CommandError):
        text = (exc.stderr_tail + " " + exc.message).lower()
        return any(
            s in text for s in ("no space left", "could not allocate block", "disk quota", "enospc")
        )
    return False


# ------------------------------------------------------------------ plan


@dataclass
class Plan:
    """What a native build will do, resolved from the options and the tree."""

    image: str
    output: Path
    fmt: DiskFormat
    filesystem: Filesystem
    layout: Layout
    ids: Ids
    kargs: tuple[str, ...]
    facts: dict[str, Any]
    tree: Path
    warnings: list[str] = field(default_factory=list)


def resolve_filesystem(opts: Options, facts: dict[str, Any]) -> Filesystem:
    if opts.filesystem is not None:
        return opts.filesystem
    declared = facts.get("install_filesystem")
    if declared:
        fs: Filesystem = _enum(Filesystem, declared, "filesystem in the image's install config")
        return fs
    return Filesystem.ext4


def check_kernel(image: str, facts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    kernels = facts["kernels"]
    if not kernels:
        raise BcvkError(
            f"image {image} has no kernel under /usr/lib/modules/<version>/ (vmlinuz) "
            "or /boot/EFI/Linux (UKI)",
            hint="a bootc image carries its kernel and initramfs; is this an application image?",
        )
    if len(kernels) > 1:
        found = ", ".join(f"{k['version']} ({k['kind']})" for k in kernels)
        raise BcvkError(
            f"image {image} has {len(kernels)} kernels, need exactly one: {found}",
            hint="remove the extra kernels from /usr/lib/modules in the image",
        )
    kernel, files = kernels[0], facts["kernel_files"][0]
    if files["kernel"] is None:
        raise BcvkError(f"kernel {kernel['path']} in image {image} is not a regular file")
    if kernel["kind"] == "vmlinuz" and files["initrd"] is None:
        raise BcvkError(
            f"kernel {kernel['version']} in image {image} has no initramfs.img beside its vmlinuz",
            hint="bootc images ship /usr/lib/modules/<version>/initramfs.img",
        )
    return kernel, files


def extras(
    work: Path, filesystem: Filesystem, ids: Ids, opts: Options, facts: dict[str, Any]
) -> list[populate.Extra]:
    """The files bcvk adds to the image's tree in the disk's root."""
    from bcvk.image import scan as populate

    (work / "extras").mkdir()
    out: list[populate.Extra] = []

    def add_file(path: str, content: str | bytes, mode: int) -> None:
        host = work / "extras" / path.strip("/").replace("/", "_")
        if isinstance(content, str):
            content = content.encode()
        host.write_bytes(content)
        out.append(populate.Extra(path, "file", mode, os.fspath(host)))

    existing = facts["existing"]
    if existing["/etc"] != "dir":
        raise BcvkError("the image has no /etc directory; it cannot be a bootable OS tree")
    add_file("/etc/fstab", fstab(filesystem, ids), 0o644)
    add_file("/etc/machine-id", "", 0o444)
    if existing["/boot"] != "dir":
        out.append(populate.Extra("/boot", "dir", 0o755))
    out.append(populate.Extra(ESP_MOUNTPOINT, "dir", 0o700))
    if opts.root_ssh_authorized_keys is not None:
        keys = opts.root_ssh_authorized_keys.read_bytes()
        if existing["/root"] != "dir":
            out.append(populate.Extra("/root", "dir", 0o700))
        if existing["/root/.ssh"] != "dir":
            out.append(populate.Extra("/root/.ssh", "dir", 0o700))
        add_file("/root/.ssh/authorized_keys", keys, 0o600)
    if facts["selinux"]:
        add_file("/.autorelabel", "", 0o644)
    return out


# ------------------------------------------------------------------ assembly


def partition_table(path: Path, layout: Layout) -> None:
    sfdisk = run.require("sfdisk", *run.sbin("sfdisk"), why="to write the partition table")
    with open(path, "ab") as f:
        f.truncate(layout.size)
    run.run(
        [sfdisk, "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never", path],
        input=sfdisk_script(layout),
    )


def assemble_raw(target: Path, layout: Layout, esp: Path, root: Path) -> None:
    partition_table(target, layout)
    copy_sparse(esp, target, layout.esp.start)
    copy_sparse(root, target, layout.root.start)


def slice_file(src: Path, dst: Path, start: int, length: int) -> None:
    with open(dst, "wb") as f:
        f.truncate(length)
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        fin.seek(start)
        remaining = length
        while remaining > 0:
            chunk = fin.read(min(remaining, 1 << 20))
            if not chunk:
                break
            if chunk.strip(b"\0"):
                fout.seek(length - remaining)
                fout.write(chunk)
            remaining -= len(chunk)


def convert(
    work: Path, layout: Layout, esp: Path, root: Path, fmt: DiskFormat, dest: Path, compress: bool
) -> None:
    """qemu-img convert of the concatenation head + ESP + root + tail: no raw copy."""
    table = work / "table.raw"
    partition_table(table, layout)
    head, tail = work / "head.raw", work / "tail.raw"
    slice_file(table, head, 0, layout.esp.start)
    slice_file(table, tail, layout.root.end, layout.size - layout.root.end)
    table.unlink()
    driver, options = _QEMU_IMG[fmt]
    qemu_img = run.require("qemu-img", *run.sbin("qemu-img"), why="to convert the disk image")
    argv: list[str | os.PathLike[str]] = [
        qemu_img, "convert", "-f", "raw",
        "-O", driver, *options,
    ]  # fmt: skip
    if compress:
        argv.append("-c")
    argv += [head, esp, root, tail, dest]
    run.run(argv)


def write_ova(
    vmdk: Path, dest: Path, name: str, capacity: int, firmware: Firmware, desc: str
) -> None:
    import tarfile

    from bcvk.to_disk import ovf

    disk_name = f"{name}-disk1.vmdk"
    spec = ovf.OvfSpec(
        name=name,
        disk_file=disk_name,
        disk_file_size=vmdk.stat().st_size,
        disk_capacity=capacity,
        firmware="uefi" if firmware is not Firmware.bios else "bios",
        os_description=desc,
    )
    text = ovf.descriptor(spec).encode()
    mf = ovf.manifest([(f"{name}.ovf", text), (disk_name, vmdk)]).encode()
    with tarfile.open(dest, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in ((f"{name}.ovf", text),):
            _add_bytes(tar, member, data)
        info = tar.gettarinfo(vmdk, arcname=disk_name)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o644
        with open(vmdk, "rb") as f:
            tar.addfile(info, f)
        _add_bytes(tar, f"{name}.mf", mf)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------ build


WORK_OWNER = "owner"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_work(output: Path) -> list[Path]:
    """Remove work directories for OUTPUT that a killed run on this host left behind.

    SIGKILL or a power cut skip the ``finally`` in work_directory; the owner file
    says which host and process a directory belonged to.  Anything without one,
    from another host, or whose process still exists is left alone.
    """
    from bcvk.to_disk import mkfs as diskfs

    removed = []
    for work in output.parent.glob(f".{glob.escape(output.name)}.bcvk-*"):
        try:
            host, pid = (work / WORK_OWNER).read_text().split()
            dead = host == platform.node() and not _pid_alive(int(pid))
        except (OSError, ValueError):
            continue
        if dead:
            logger.info("Removing %s, left by an interrupted run (pid %s)", work, pid)
            diskfs.remove_tree(work)
            removed.append(work)
    return removed


@contextlib.contextmanager
def work_directory(output: Path) -> Iterator[Path]:
    """A hidden directory beside OUTPUT (same filesystem, so rename is atomic)."""
    from bcvk.to_disk import mkfs as diskfs

    sweep_stale_work(output)
    work = output.parent / f".{output.name}.bcvk-{secrets.token_hex(4)}"
    work.mkdir(mode=0o700)
    try:
        (work / WORK_OWNER).write_text(f"{platform.node()} {os.getpid()}\n")
        yield work
    finally:
        diskfs.remove_tree(work)


def build(
    image: str,
    output: str | os.PathLike[str],
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
) -> Result:
    """Build (or reuse) a bootable disk at OUTPUT from IMAGE; see ``bcvk to-disk --help``."""
    opts = Options(
        format=_enum(DiskFormat, format, "format") if format is not None else None,
        filesystem=_enum(Filesystem, filesystem, "filesystem") if filesystem else None,
        disk_size=_size(disk_size, "--disk-size"),
        root_size=_size(root_size, "--root-size"),
        kargs=tuple(kargs),
        root_ssh_authorized_keys=Path(root_ssh_authorized_keys)
        if root_ssh_authorized_keys is not None
        else None,
        installer=_enum(Installer, installer, "installer"),
        firmware=_enum(Firmware, firmware, "firmware"),
        partition_table=_enum(PartitionTable, partition_table, "partition table"),
        compress=compress,
        dry_run=dry_run,
        force=force,
        install_log=install_log or None,
    )
    return run_options(image, Path(output), opts)


def validate(opts: Options, fmt: DiskFormat) -> None:
    if opts.compress and fmt is not DiskFormat.qcow2:
        raise UsageError(
            f"--compress applies to qcow2 only (OUTPUT is {fmt.value})",
            hint="vmdk/ova are always compressed (streamOptimized); drop --compress",
        )
    if opts.firmware is not Firmware.uefi and opts.installer is not Installer.bootc:
        raise UsageError(
            f"--firmware {opts.firmware.value} is not supported by the native installer",
            hint="BIOS boot needs GRUB written into a BIOS boot partition and the MBR gap, "
            "which bcvk cannot do without root and a GRUB in the image; use --firmware uefi "
            "(OVMF for VMs)",
        )
    for karg in opts.kargs:
        if not karg or any(c in karg for c in "\n\r"):
            raise UsageError(f"invalid kernel argument {karg!r}")
    # Only the bootc installer reads it; the native one has --debug instead.
    if opts.install_log is not None and not re.fullmatch(r"[A-Za-z0-9_:=,.\-]+", opts.install_log):
        raise UsageError(
            f"invalid --install-log filter {opts.install_log!r}",
            hint="a RUST_LOG filter such as debug or bootc_lib=trace,info",
        )
    keys = opts.root_ssh_authorized_keys
    if keys is not None and not keys.is_file():
        raise NotFoundError(
            f"--root-ssh-authorized-keys file {keys} does not exist",
            hint="pass a file of public keys, e.g. ~/.ssh/id_ed25519.pub",
        )


def run_options(image: str, output: Path, opts: Options) -> Result:
    start = time.monotonic()
    image = normalize_reference(image)
    output = Path(os.path.abspath(output))
    fmt = opts.format or format_from_path(output)
    validate(opts, fmt)
    check_output_path(output)
    info = podman.local_image(image, bootc=True)
    digest = info.digest or info.id
    disk_size = opts.disk_size or default_disk_size(info.size)
    key = cache_key(image, digest, fmt, disk_size, opts)
    expected = cache_hash(key)
    logger.debug("cache key %s = %s", json.dumps(key, sort_keys=True), expected)

    if os.path.lexists(output):
        if not output.is_file() or output.is_symlink():
            raise BcvkError(
                f"OUTPUT {output} exists and is not a regular file",
                hint="remove it or choose another OUTPUT",
            )
        existing = read_xattr(output, XATTR_HASH)
        if not created_by_bcvk(output) and not opts.force:
            raise BcvkError(
                f"refusing to overwrite {output}: bcvk did not create it",
                hint="pass --force to replace it, or choose another OUTPUT",
            )
        if existing == expected:
            # --force permits replacing a foreign file; an exact cache hit is
            # still reused (delete OUTPUT to force a rebuild).
            action = "would-reuse" if opts.dry_run else "reused"
            if not opts.dry_run:
                logger.info("Reusing existing cached disk image at: %s", output)
            return Result(output, action, expected, digest, fmt, size=output.stat().st_size,
                          seconds=time.monotonic() - start)  # fmt: skip
    if opts.dry_run:
        return Result(output, "would-regenerate", expected, digest, fmt)

    warnings: list[str] = []
    why = xattrs_supported(output.parent)
    if why is not None:
        warnings.append(
            f"the filesystem holding {output.parent} does not support user extended "
            f"attributes ({why}): bcvk cannot record the cache key, so every run rebuilds "
            "the disk and replacing it needs --force; write to ext4, xfs, btrfs or tmpfs "
            "(/var/tmp, your home) to get caching"
        )
        logger.warning("%s", warnings[-1])

    installer = opts.installer
    if installer is Installer.bootc:
        from bcvk.to_disk import bootc as to_disk_bootc

        return to_disk_bootc.build(image, output, opts, fmt, disk_size, expected, digest, start)
    try:
        with work_directory(output) as work, podman.image_mount(image) as mount:
            plan_warnings, fs, size = build_native(
                image, output, opts, fmt, disk_size, mount, work, expected, digest, info.size
            )
    except _UseBootc:
        from bcvk.to_disk import bootc as to_disk_bootc

        logger.info("The image contains bootc: installing with its own `bootc install to-disk`")
        return to_disk_bootc.build(image, output, opts, fmt, disk_size, expected, digest, start)
    except (OSError, CommandError) as exc:
        if _no_space(exc):
            raise BcvkError(
                f"no space left on the filesystem holding {output.parent} while building "
                "the disk; nothing was written to OUTPUT",
                hint="free some space or choose an OUTPUT on a bigger filesystem "
                f"(raw disks are sparse; a {fmt.value} needs about twice the image size "
                "while it is built)",
            ) from exc
        raise
    warnings += plan_warnings
    seconds = time.monotonic() - start
    logger.info("Wrote %s (%s, %s, %.1fs)", output, fmt.value, fs.value, seconds)
    return Result(output, "created", expected, digest, fmt, fs, size, seconds, tuple(warnings))


def preflight(filesystem: Filesystem, fmt: DiskFormat) -> None:
    """Fail before any work when a host tool for this disk is missing."""
    tools = {
        Filesystem.ext4: ("mkfs.ext4", "debugfs"),
        Filesystem.xfs: ("mkfs.xfs", "xfs_db"),
        Filesystem.btrfs: ("mkfs.btrfs",),
    }[filesystem]
    tools += ("sfdisk", "mkfs.vfat", "mcopy")
    if fmt is not DiskFormat.raw:
        tools += ("qemu-img",)
    for tool in tools:
        run.require(tool, *run.sbin(tool), why=f"for a {filesystem.value} {fmt.value} disk")


def build_native(
    image: str,
    output: Path,
    opts: Options,
    fmt: DiskFormat,
    disk_size: int,
    mount: podman.ImageMount,
    work: Path,
    cache: str,
    digest: str,
    image_size: int,
) -> tuple[list[str], Filesystem, int]:
    from bcvk.to_disk import mkfs as diskfs

    tree = mount.path

    warnings: list[str] = []

    def warn(text: str) -> None:
        warnings.append(text)
        logger.warning("%s", text)

    arch = host_arch()
    with step("Reading the image"):
        facts = diskfs.helper("facts", tree, arch)
    kernel, files = check_kernel(image, facts)
    if opts.installer is Installer.auto and facts["has_bootc"]:
        # An image with bootc installs itself from a VM by default.
        from bcvk.to_disk import bootc as to_disk_bootc

        if to_disk_bootc.available():
            raise _UseBootc
        warn(
            "the image contains bootc, but the bootc installer is not available in this "
            "bcvk (it needs the ephemeral VM layer): using the native installer"
        )
    filesystem = resolve_filesystem(opts, facts)
    preflight(filesystem, fmt)
    if facts["has_bootc"]:
        warn(
            "the image contains bootc but the native installer builds a plain root "
            "filesystem, not an ostree deployment: `bootc upgrade`/`bootc rollback` "
            "will not work in this disk"
        )
    if facts["selinux"]:
        logger.info("SELinux policy found: the disk relabels itself on first boot (/.autorelabel)")
    if filesystem is Filesystem.ext4:
        # mkfs.ext4 -d keeps everything: no loss to list, and the image's
        # size from podman is its content size; skip walking the tree.
        scan: dict[str, Any] = {"content_bytes": image_size, "loss": {}}
    else:
        scan = diskfs.helper("scan", tree, filesystem.value)
    ids = Ids.generate()
    layout = compute_layout(
        disk_size,
        content_bytes=int(scan["content_bytes"]),
        filesystem=filesystem,
        ids=ids,
        root_size=opts.root_size,
        table=opts.partition_table,
        arch=arch,
    )
    kargs = (*facts["image_kargs"], *opts.kargs)
    uki = kernel["kind"] == "uki"
    if uki and kargs:
        warn("the image boots a UKI: its command line is sealed, --karg is not applied")
    loss = diskfs.loss_warning(filesystem, scan["loss"])
    if loss:
        warn(loss)
    plan = Plan(image, output, fmt, filesystem, layout, ids, kargs, facts, tree, warnings)
    add = extras(work, filesystem, ids, opts, facts)

    root_img = work / "root.img"
    with open(root_img, "wb") as f:
        f.truncate(layout.root.size)
    with step(
        f"Populating the {filesystem.value} root filesystem ({format_size(layout.root.size)})"
    ):
        diskfs.BUILDERS[filesystem](
            diskfs.RootSpec(tree, ids.root_fs, add, facts["existing"]), root_img, work
        )

    with step("Installing systemd-boot and the kernel on the EFI system partition"):
        esp_img = make_esp(plan, work, kernel, files, arch)
    # Nothing reads the image from here on: unmount while the disk converts.
    mount.release()

    dest = work / f"disk.{fmt.value}"
    if fmt is DiskFormat.raw:
        with step("Assembling the disk"):
            assemble_raw(dest, layout, esp_img, root_img)
    else:
        target = work / "disk.vmdk" if fmt is DiskFormat.ova else dest
        with step(f"Converting to {_QEMU_IMG[fmt][0]}"):
            convert(work, layout, esp_img, root_img, fmt, target, opts.compress)
        if fmt is DiskFormat.ova:
            with step("Packing the OVA"):
                pretty = facts["os_release"].get("PRETTY_NAME") or "Linux"
                write_ova(target, dest, output.stem, layout.size, opts.firmware, pretty)
    size = finish(dest, output, cache, digest)
    return warnings, filesystem, size


class _UseBootc(Exception):
    """Raised out of the native path when --installer auto picks bootc."""


def finish(dest: Path, output: Path, cache: str, digest: str) -> int:
    """Mark DEST as bcvk's (cache key xattrs) and rename it to OUTPUT atomically."""
    for name, value in ((XATTR_HASH, cache), (XATTR_DIGEST, digest), (XATTR_CREATOR, __version__)):
        with contextlib.suppress(OSError):
            os.setxattr(dest, name, value.encode())
    size = dest.stat().st_size
    os.replace(dest, output)
    return size


def convert_raw(
    src: Path, dest: Path, fmt: DiskFormat, compress: bool, work: Path, capacity: int, name: str
) -> None:
    """One whole raw disk → FMT (for disks another installer wrote)."""
    driver, options = _QEMU_IMG[fmt]
    qemu_img = run.require("qemu-img", *run.sbin("qemu-img"), why="to convert the disk image")
    target = work / "disk.vmdk" if fmt is DiskFormat.ova else dest
    argv: list[str | os.PathLike[str]] = [qemu_img, "convert", "-f", "raw", "-O", driver, *options]
    if compress:
        argv.append("-c")
    run.run([*argv, src, target])
    if fmt is DiskFormat.ova:
        write_ova(target, dest, name, capacity, Firmware.uefi, "Linux")
        target.unlink()


def make_esp(
    plan: Plan, work: Path, kernel: dict[str, Any], files: dict[str, Any], arch: str
) -> Path:
    from bcvk.to_disk import bootloader
    from bcvk.to_disk import mkfs as diskfs

    boot_files = work / "boot-files"
    boot_files.mkdir()
    boot_src = plan.facts["systemd_boot"]
    copies = [
        (files["kernel"], "kernel"),
        (files["initrd"], "initrd"),
        (boot_src, "systemd-boot.efi"),
    ]
    for src, name in copies:
        if src:
            run.run(diskfs.in_namespace(["cp", "--no-preserve=all", src, boot_files / name]))
    if boot_src:
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
    uki = kernel["kind"] == "uki"
    entry = None
    if not uki:
        entry = bootloader.make_entry(
            plan.facts["os_release"],
            kernel["version"],
            bootloader.kernel_cmdline(plan.ids.root_fs, plan.kargs),
            has_initrd=files["initrd"] is not None,
        )
        logger.debug("boot entry: %s", bootloader.describe(entry))
    esp_files = bootloader.EspFiles(
        systemd_boot=systemd_boot,
        kernel=boot_files / "kernel",
        initrd=boot_files / "initrd" if files["initrd"] else None,
        uki=uki,
    )
    stage = work / "esp"
    stage.mkdir()
    bootloader.stage_esp(stage, esp_files, entry, arch, uki_name=f"{kernel['version']}.efi")
    esp_img = work / "esp.img"
    bootloader.build_esp(esp_img, plan.layout.esp.size, stage, plan.ids.esp_fs)
    shutil.rmtree(stage)
    shutil.rmtree(boot_files)
    return esp_img
