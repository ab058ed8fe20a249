"""From partition images to the disk file: the partition table, raw assembly,
qemu-img conversion, and OVA packing.

The native installer never writes a whole raw disk it does not need: for
formats other than raw, qemu-img converts the concatenation of the table's
head, the ESP, the root filesystem and the table's tail straight into the
target format.
"""

from __future__ import annotations

import errno
import io
import os
import tarfile
import time
from pathlib import Path

from bcvk import run
from bcvk.to_disk import ovf
from bcvk.to_disk.layout import Layout, sfdisk_script
from bcvk.to_disk.options import DiskFormat
from bcvk.values import Firmware

# qemu-img output driver and options per format
QEMU_IMG: dict[DiskFormat, tuple[str, tuple[str, ...]]] = {
    DiskFormat.qcow2: ("qcow2", ()),
    DiskFormat.vmdk: ("vmdk", ("-o", "subformat=streamOptimized")),
    DiskFormat.vhd: ("vpc", ("-o", "subformat=dynamic,force_size=on")),
    DiskFormat.vhdx: ("vhdx", ()),
    DiskFormat.ova: ("vmdk", ("-o", "subformat=streamOptimized")),
}
# USTAR member names hold at most 100 bytes; the OVA's longest is NAME-disk1.vmdk.
OVA_NAME_MAX = 100 - len("-disk1.vmdk")


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
    driver, options = QEMU_IMG[fmt]
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
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def convert_raw(
    src: Path, dest: Path, fmt: DiskFormat, compress: bool, work: Path, capacity: int, name: str
) -> None:
    """One whole raw disk → FMT (for disks another installer wrote)."""
    driver, options = QEMU_IMG[fmt]
    qemu_img = run.require("qemu-img", *run.sbin("qemu-img"), why="to convert the disk image")
    target = work / "disk.vmdk" if fmt is DiskFormat.ova else dest
    argv: list[str | os.PathLike[str]] = [qemu_img, "convert", "-f", "raw", "-O", driver, *options]
    if compress:
        argv.append("-c")
    run.run([*argv, src, target])
    if fmt is DiskFormat.ova:
        write_ova(target, dest, name, capacity, Firmware.uefi, "Linux")
        target.unlink()
