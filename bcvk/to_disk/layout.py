"""Disk layout model: partition geometry, sfdisk scripts and fstab (pure).

Nothing here starts a process or touches a file: a ``Layout`` is computed
from sizes and options, and rendered into the text other programs read
(``sfdisk`` scripts, ``/etc/fstab``).  ``bcvk.to_disk.native`` turns it
into bytes.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

from bcvk.errors import UsageError
from bcvk.image.scan import LossKind
from bcvk.values import GIB, MIB, format_size

SECTOR = 512
ALIGN = MIB  # partitions start and end on MiB boundaries
ESP_SIZE = 512 * MIB
# GPT reserves 33 sectors at the end of the disk for the backup header.
GPT_TAIL = 33 * SECTOR

# Bump when the bytes bcvk writes for the same inputs change meaning (the
# partition layout, bootloader set-up, files added to the root): it is part
# of the cache key, so old cached disks are regenerated.
LAYOUT_VERSION = 1

ESP_TYPE_GPT = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ESP_TYPE_MBR = "ef"
LINUX_TYPE_MBR = "83"
# Discoverable Partitions Specification: root partition type per architecture
# (systemd-gpt-auto-generator finds the root by this type).
ROOT_TYPES = {
    "x86_64": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    "aarch64": "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
    "ppc64le": "C31C45E6-3F39-412E-80FB-4809C4980599",
    "s390x": "5EEAD9A9-FE09-4A1E-A1D7-520D00531306",
    "riscv64": "72EC70A6-CF74-40E6-BD49-4BDA08E8F224",
}


class Filesystem(enum.StrEnum):
    ext4 = "ext4"
    xfs = "xfs"
    btrfs = "btrfs"

    @property
    def fsck_pass(self) -> int:
        # xfs and btrfs have no boot-time fsck worth running.
        return 1 if self is Filesystem.ext4 else 0

    @property
    def min_size(self) -> int:
        """The smallest filesystem each mkfs accepts (xfsprogs ≥ 5.19: 300 MiB)."""
        return {"ext4": 16 * MIB, "xfs": 300 * MIB, "btrfs": 256 * MIB}[self.value]

    @property
    def tools(self) -> tuple[str, ...]:
        """The host programs that build it (checked before any work starts)."""
        return {
            "ext4": ("mkfs.ext4", "debugfs"),
            "xfs": ("mkfs.xfs", "xfs_db"),
            "btrfs": ("mkfs.btrfs",),
        }[self.value]

    @property
    def losses(self) -> frozenset[LossKind]:
        """What its tool cannot carry over from the tree (bcvk.image.scan has the table)."""
        if self is Filesystem.xfs:
            return frozenset({LossKind.xattrs, LossKind.hard_links, LossKind.unnamed})
        if self is Filesystem.btrfs:
            return frozenset({LossKind.device_nodes})
        return frozenset()

    @property
    def tool(self) -> str:
        """How bcvk fills it, for messages."""
        return {
            "ext4": "mkfs.ext4 -d",
            "xfs": "mkfs.xfs -p (protofile)",
            "btrfs": "mkfs.btrfs --rootdir",
        }[self.value]


class PartitionTable(enum.StrEnum):
    gpt = "gpt"
    mbr = "mbr"


@dataclass(frozen=True)
class Partition:
    number: int
    name: str
    start: int  # bytes
    size: int  # bytes
    type: str  # GPT type GUID or MBR type byte (hex)
    uuid: str | None  # GPT partition UUID; None on MBR

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Layout:
    size: int
    table: PartitionTable
    esp: Partition
    root: Partition
    disk_id: str  # GPT disk GUID, or MBR disk signature as 0xXXXXXXXX

    @property
    def partitions(self) -> tuple[Partition, ...]:
        return (self.esp, self.root)


def align_up(value: int, to: int = ALIGN) -> int:
    return -(-value // to) * to


def align_down(value: int, to: int = ALIGN) -> int:
    return value // to * to


def min_root_size(content_bytes: int, filesystem: Filesystem) -> int:
    """Room a filesystem needs for CONTENT_BYTES of files, with headroom.

    Measured on the demo image: ext4 -d needs ~1.08×, btrfs ~1.12× (metadata
    duplicated), xfs ~1.05× plus its log.  25% + 128 MiB leaves space for
    the first boot to write its journal and machine state.
    """
    needed = align_up(int(content_bytes * 1.25) + 128 * MIB)
    return max(needed, filesystem.min_size)


def min_disk_size(content_bytes: int, filesystem: Filesystem) -> int:
    return ALIGN + ESP_SIZE + min_root_size(content_bytes, filesystem) + ALIGN


def default_disk_size(image_size: int) -> int:
    """Upstream's rule: twice the image, at least 4 GiB."""
    return align_up(max(2 * image_size, 4 * GIB))


@dataclass(frozen=True)
class Ids:
    """The random identifiers a disk carries; inputs so that rendering is pure."""

    disk: str
    esp_part: str
    root_part: str
    root_fs: str
    esp_fs: str  # FAT volume id, 8 hex digits

    @classmethod
    def generate(cls) -> Ids:
        return cls(
            disk=str(uuid.uuid4()),
            esp_part=str(uuid.uuid4()),
            root_part=str(uuid.uuid4()),
            root_fs=str(uuid.uuid4()),
            esp_fs=uuid.uuid4().hex[:8].upper(),
        )

    @property
    def esp_fs_uuid(self) -> str:
        """The FAT volume id as /dev/disk/by-uuid spells it (``ABCD-1234``)."""
        return f"{self.esp_fs[:4]}-{self.esp_fs[4:]}"


def compute_layout(
    disk_size: int,
    *,
    content_bytes: int,
    filesystem: Filesystem,
    ids: Ids,
    root_size: int | None = None,
    table: PartitionTable = PartitionTable.gpt,
    arch: str = "x86_64",
) -> Layout:
    """ESP at 1 MiB, root right after it filling the disk (or ROOT_SIZE).

    Raises ``UsageError`` naming the minimum when the sizes cannot hold the
    content.
    """
    if arch not in ROOT_TYPES:
        raise UsageError(
            f"no root partition type known for architecture {arch}",
            hint="known: " + ", ".join(sorted(ROOT_TYPES)),
        )
    size = align_up(disk_size)
    minimum = min_disk_size(content_bytes, filesystem)
    min_root = min_root_size(content_bytes, filesystem)
    if size < minimum:
        raise UsageError(
            f"disk size {format_size(size)} is too small for this image: "
            f"the minimum is {format_size(minimum)} ({minimum // MIB}M) "
            f"with {filesystem.value}",
            hint=f"use --disk-size {-(-minimum // GIB)}G or more, or omit it for the default",
        )
    esp = Partition(
        number=1,
        name="EFI-SYSTEM",
        start=ALIGN,
        size=ESP_SIZE,
        type=ESP_TYPE_GPT if table is PartitionTable.gpt else ESP_TYPE_MBR,
        uuid=ids.esp_part if table is PartitionTable.gpt else None,
    )
    root_start = esp.end
    available = align_down(size - GPT_TAIL - root_start)
    if root_size is not None:
        root_size = align_up(root_size)
        if root_size < min_root:
            raise UsageError(
                f"root size {format_size(root_size)} is too small for this image: "
                f"the minimum is {format_size(min_root)} ({min_root // MIB}M) "
                f"with {filesystem.value}",
                hint=f"use --root-size {-(-min_root // MIB)}M or more",
            )
        if root_size > available:
            raise UsageError(
                f"root size {format_size(root_size)} does not fit a "
                f"{format_size(size)} disk (at most {available // MIB}M)",
                hint="raise --disk-size or lower --root-size",
            )
        available = root_size
    root = Partition(
        number=2,
        name="root",
        start=root_start,
        size=available,
        type=ROOT_TYPES[arch] if table is PartitionTable.gpt else LINUX_TYPE_MBR,
        uuid=ids.root_part if table is PartitionTable.gpt else None,
    )
    disk_id = ids.disk if table is PartitionTable.gpt else "0x" + ids.disk.replace("-", "")[:8]
    return Layout(size=size, table=table, esp=esp, root=root, disk_id=disk_id)


def sfdisk_script(layout: Layout) -> str:
    """The sfdisk input that writes LAYOUT's partition table."""
    gpt = layout.table is PartitionTable.gpt
    lines = [
        f"label: {'gpt' if gpt else 'dos'}",
        f"label-id: {layout.disk_id}",
        "unit: sectors",
        "sector-size: 512",
    ]
    if gpt:
        lines.append(f"first-lba: {ALIGN // SECTOR}")
    lines.append("")
    for part in layout.partitions:
        fields = [
            f"start={part.start // SECTOR}",
            f"size={part.size // SECTOR}",
            f"type={part.type}",
        ]
        if gpt:
            fields += [f"uuid={part.uuid}", f'name="{part.name}"']
        elif part is layout.esp:
            fields.append("bootable")
        lines.append(", ".join(fields))
    return "\n".join(lines) + "\n"


ESP_MOUNTPOINT = "/boot/efi"


def fstab(filesystem: Filesystem, ids: Ids) -> str:
    """/etc/fstab for the disk: root and ESP by filesystem UUID."""
    root_opts = "defaults"
    return (
        "# Written by bcvk to-disk: root and EFI system partition by UUID.\n"
        f"UUID={ids.root_fs} / {filesystem.value} {root_opts} 0 {filesystem.fsck_pass}\n"
        f"UUID={ids.esp_fs_uuid} {ESP_MOUNTPOINT} vfat umask=0077,shortname=winnt,nofail 0 2\n"
    )
