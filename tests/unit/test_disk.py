"""Disk layout, sfdisk scripts and fstab: pure functions against goldens."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bcvk.errors import UsageError
from bcvk.to_disk import layout as disk
from bcvk.to_disk.layout import Filesystem, Ids, PartitionTable
from bcvk.values import GIB, MIB

IDS = Ids(
    disk="6f1e9a4c-0b5e-4d3a-9d8e-2c1f3b4a5d6e",
    esp_part="11111111-2222-4333-8444-555555555555",
    root_part="66666666-7777-4888-9999-aaaaaaaaaaaa",
    root_fs="0e6c5f2a-1b3d-4e5f-8a9b-0c1d2e3f4a5b",
    esp_fs="ABCD1234",
)


def layout(**kwargs: object) -> disk.Layout:
    options: dict[str, object] = {
        "content_bytes": 450 * MIB,
        "filesystem": Filesystem.ext4,
        "ids": IDS,
    }
    options.update(kwargs)
    return disk.compute_layout(4 * GIB, **options)  # type: ignore[arg-type]


def test_gpt_layout_geometry() -> None:
    lay = layout()
    assert lay.esp.start == MIB
    assert lay.esp.size == 512 * MIB
    assert lay.root.start == 513 * MIB
    # whole MiBs, leaving room for the backup GPT at the end
    assert lay.root.size % MIB == 0
    assert lay.root.end <= 4 * GIB - disk.GPT_TAIL
    assert lay.root.type == disk.ROOT_TYPES["x86_64"]
    assert lay.root.type == "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"


def test_sfdisk_gpt_golden(golden: Callable[[str, str], None]) -> None:
    golden("to-disk/sfdisk-gpt.txt", disk.sfdisk_script(layout()))


def test_sfdisk_mbr_golden(golden: Callable[[str, str], None]) -> None:
    script = disk.sfdisk_script(layout(table=PartitionTable.mbr))
    assert "type=ef" in script
    assert "bootable" in script
    golden("to-disk/sfdisk-mbr.txt", script)


def test_root_size_limits_the_root_partition() -> None:
    lay = layout(root_size=2 * GIB)
    assert lay.root.size == 2 * GIB


@pytest.mark.parametrize("fs", list(Filesystem))
def test_fstab_golden(fs: Filesystem, golden: Callable[[str, str], None]) -> None:
    text = disk.fstab(fs, IDS)
    assert f"UUID={IDS.root_fs} / {fs.value} " in text
    assert "UUID=ABCD-1234 /boot/efi vfat" in text
    golden(f"to-disk/fstab-{fs.value}.txt", text)


def test_too_small_disk_names_the_minimum() -> None:
    with pytest.raises(UsageError) as exc:
        disk.compute_layout(1 * GIB, content_bytes=900 * MIB, filesystem=Filesystem.ext4, ids=IDS)
    minimum = disk.min_disk_size(900 * MIB, Filesystem.ext4)
    assert f"{minimum // MIB}M" in str(exc.value)
    assert "too small" in str(exc.value)
    assert exc.value.hint is not None
    assert "--disk-size" in exc.value.hint


def test_too_small_root_size_names_the_minimum() -> None:
    with pytest.raises(UsageError) as exc:
        layout(root_size=100 * MIB)
    assert "root size" in str(exc.value)
    assert f"{disk.min_root_size(450 * MIB, Filesystem.ext4) // MIB}M" in str(exc.value)


def test_root_size_larger_than_disk() -> None:
    with pytest.raises(UsageError, match="does not fit"):
        layout(root_size=8 * GIB)


def test_xfs_minimum_is_its_tool_minimum() -> None:
    assert disk.min_root_size(1 * MIB, Filesystem.xfs) == 300 * MIB


def test_default_disk_size_is_upstreams_rule() -> None:
    assert disk.default_disk_size(415 * MIB) == 4 * GIB
    assert disk.default_disk_size(3 * GIB) == 6 * GIB


def test_unknown_architecture() -> None:
    with pytest.raises(UsageError, match="architecture"):
        layout(arch="m68k")


def test_generated_ids_are_unique_and_well_formed() -> None:
    a, b = Ids.generate(), Ids.generate()
    assert a != b
    assert len(a.esp_fs) == 8
    assert a.esp_fs_uuid[4] == "-"
