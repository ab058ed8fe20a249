"""Read the file list of an initramfs to learn what it can mount.

An initramfs is one or more concatenated cpio ("newc") archives, the last
usually compressed; early-microcode images put an uncompressed one first.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
from pathlib import Path

from bcvk import run
from bcvk.log import logger

_CPIO_MAGICS = (b"070701", b"070702")
_HEADER_LEN = 110

# capability → module basenames that must be present (in the initramfs or
# built into the kernel)
MODULES: dict[str, tuple[str, ...]] = {
    "virtiofs": ("virtiofs",),
    "9p": ("9p", "9pnet_virtio"),
    "virtio_blk": ("virtio_blk",),
    "ext4": ("ext4",),
    "xfs": ("xfs",),
    "btrfs": ("btrfs",),
    "overlay": ("overlay",),
}


def _align4(n: int) -> int:
    return (n + 3) & ~3


def cpio_names(data: bytes, offset: int = 0) -> tuple[list[str], int]:
    """Names in consecutive cpio archives starting at OFFSET, and where they end."""
    names: list[str] = []
    while offset + _HEADER_LEN <= len(data):
        # Archives are padded with NULs between members of a concatenation.
        while offset < len(data) and data[offset] == 0:
            offset += 1
        if data[offset : offset + 6] not in _CPIO_MAGICS:
            break
        header = data[offset : offset + _HEADER_LEN]
        try:
            filesize = int(header[54:62], 16)
            namesize = int(header[94:102], 16)
        except ValueError:
            break  # a damaged header: the rest of the archive is not understood
        name_start = offset + _HEADER_LEN
        name = data[name_start : name_start + namesize - 1].decode(errors="replace")
        offset = _align4(name_start + namesize)
        offset = _align4(offset + filesize)
        if name != "TRAILER!!!":
            names.append(name)
    return names, offset


def _decompress(data: bytes) -> bytes | None:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00" or data[:3] == b"\x5d\x00\x00":
        return lzma.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        zstd = shutil.which("zstd")
        if zstd is None:
            logger.debug("initramfs is zstd-compressed and zstd is not installed")
            return None
        out: bytes = run.run([zstd, "-dc"], input=data, text=False).stdout
        return out
    return None


def list_files(path: Path) -> list[str] | None:
    """All member names, or ``None`` if the format is not understood."""
    data = path.read_bytes()
    names, offset = cpio_names(data)
    while offset < len(data) and data[offset] == 0:
        offset += 1
    if offset < len(data):
        try:
            rest = _decompress(data[offset:])
        except (OSError, EOFError, lzma.LZMAError):
            rest = None
        if rest is None:
            return names or None
        more, _ = cpio_names(rest)
        names += more
    return names


def _module_name(path: str) -> str | None:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if base.endswith(suffix):
            return base[: -len(suffix)].replace("-", "_")
    return None


def capabilities_from_names(names: list[str], builtin: str = "") -> dict[str, bool]:
    present = {m for m in map(_module_name, names) if m}
    present |= {m for m in map(_module_name, builtin.split()) if m}
    caps = {cap: all(m in present for m in mods) for cap, mods in MODULES.items()}
    caps["systemd"] = any(
        n.endswith(("lib/systemd/systemd", "lib/systemd/systemd-executor")) for n in names
    )
    # initramfs-tools' /init sources conf/initramfs.conf first thing.
    caps["initramfs_tools"] = any(n.lstrip("./") == "conf/initramfs.conf" for n in names)
    return caps


def capabilities(path: Path, builtin: str = "") -> dict[str, bool]:
    names = list_files(path)
    if names is None:
        return {}
    return capabilities_from_names(names, builtin)
