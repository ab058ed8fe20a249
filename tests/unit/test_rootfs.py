"""The per-image cache: UKI parsing, ext4 sizing/building, locking, pruning."""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import pytest

from bcvk import paths
from bcvk.ephemeral import cache as rootfs
from bcvk.errors import BcvkError
from bcvk.guest import initrd
from bcvk.image import uki as ukimod


def make_pe(sections: dict[str, bytes]) -> bytes:
    """A minimal PE/COFF file with the given sections (enough for a UKI parser)."""
    pe_offset = 0x80
    optional_size = 0xF0
    header = bytearray(pe_offset)
    header[0:2] = b"MZ"
    struct.pack_into("<I", header, 0x3C, pe_offset)
    coff = b"PE\0\0" + struct.pack("<HHIIIHH", 0x8664, len(sections), 0, 0, 0, optional_size, 0)
    table_start = pe_offset + len(coff) + optional_size
    data_start = table_start + 40 * len(sections)
    table = b""
    body = b""
    for name, content in sections.items():
        raw_size = (len(content) + 511) // 512 * 512
        offset = data_start + len(body)
        table += struct.pack(
            "<8sIIIIIIHHI", name.encode(), len(content), 0x1000, raw_size, offset, 0, 0, 0, 0, 0
        )
        body += content + b"\0" * (raw_size - len(content))
    return bytes(header) + coff + b"\0" * optional_size + table + body


def test_pe_sections_are_cut_to_their_virtual_size() -> None:
    pe = make_pe({".linux": b"KERNEL" * 100, ".initrd": b"INITRD", ".cmdline": b"quiet"})
    sections = ukimod.pe_sections(pe)
    assert sections[".linux"] == b"KERNEL" * 100
    assert sections[".initrd"] == b"INITRD"
    assert sections[".cmdline"] == b"quiet"


def test_extract_uki(tmp_path: Path) -> None:
    uki = tmp_path / "linux.efi"
    uki.write_bytes(make_pe({".linux": b"K", ".initrd": b"I"}))
    assert ukimod.extract_uki(uki, tmp_path / "k", tmp_path / "i")
    assert (tmp_path / "k").read_bytes() == b"K"
    assert (tmp_path / "i").read_bytes() == b"I"
    uki.write_bytes(make_pe({".text": b"x"}))
    with pytest.raises(BcvkError, match="no .linux section"):
        ukimod.extract_uki(uki, tmp_path / "k", tmp_path / "i")


@pytest.mark.parametrize("data", [b"", b"ELF" * 40, b"MZ" + b"\0" * 0x3A + b"\x40\0\0\0" + b"XX"])
def test_non_pe_files_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="not a PE file"):
        ukimod.pe_sections(data)


def test_label_fits_ext4() -> None:
    label = rootfs.label_for("sha256:" + "ab" * 32)
    assert label == "bcvk-abababababa"
    assert len(label) <= 16


def make_tree(root: Path) -> Path:
    (root / "usr/lib/modules/6.1.0-test").mkdir(parents=True)
    (root / "usr/lib/modules/6.1.0-test/vmlinuz").write_bytes(b"\x00kernel" * 100)
    (root / "usr/lib/modules/6.1.0-test/initramfs.img").write_bytes(b"initrd")
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/init").symlink_to("../lib/systemd/systemd")
    (root / "usr/lib/systemd").mkdir(parents=True)
    (root / "usr/lib/systemd/systemd").write_text("#!")
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=test\nVERSION_ID=1\n")
    (root / "etc/big").write_bytes(os.urandom(300_000))
    os.link(root / "etc/big", root / "etc/big-link")
    (root / "sbin").symlink_to("usr/sbin")
    return root


def test_tree_usage_counts_hard_links_once(tmp_path: Path) -> None:
    used, inodes = rootfs.tree_usage(make_tree(tmp_path / "t"))
    assert 300_000 <= used < 400_000
    assert 10 <= inodes < 30
    assert rootfs.ext4_size(used, inodes) >= used + 64 * 1024 * 1024


def test_mkfs_argv_makes_a_read_only_friendly_fs(tmp_path: Path) -> None:
    argv = rootfs.mkfs_argv("mkfs.ext4", tmp_path, tmp_path / "o", "bcvk-x", 100 * 1024**2, 10)
    assert argv[argv.index("-L") + 1] == "bcvk-x"
    assert argv[argv.index("-d") + 1] == str(tmp_path)
    assert "^has_journal" in argv[argv.index("-O") + 1]
    assert argv[-1] == "102400k"


@pytest.fixture
def cache(isolated_home: Path) -> Path:
    return isolated_home / "cache" / "bcvk" / "images"


@pytest.mark.skipif(
    not any(Path(p, "mkfs.ext4").exists() for p in ("/usr/sbin", "/sbin")),
    reason="needs mkfs.ext4 (e2fsprogs)",
)
def test_prepare_builds_once_even_when_two_vms_start_together(tmp_path: Path, cache: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    mounts: list[int] = []
    results: list[rootfs.Prepared] = []

    def mount() -> Path:
        mounts.append(1)
        time.sleep(0.2)  # widen the race window
        return tree

    def start() -> None:
        results.append(rootfs.prepare("img", "sha256:" + "cd" * 32, block=True, mount=mount))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(mounts) == 1
    first, second = results
    assert first.rootfs == second.rootfs
    assert first.rootfs is not None
    assert first.rootfs.exists()
    assert first.label == "bcvk-cdcdcdcdcdc"
    assert first.kernel.read_bytes() == b"\x00kernel" * 100
    assert first.initrd is not None
    # The image's initramfs, padded to 4 bytes, then bcvk's own archive.
    assert first.initrd.read_bytes() == b"initrd\0\0" + initrd.archive()
    assert first.initrd == second.initrd
    assert first.facts.os_release["ID"] == "test"
    # No temporary files are left next to the results.
    entry = cache / ("cd" * 32)
    assert sorted(p.name for p in entry.iterdir()) == sorted(
        [
            "facts.json",
            "image.json",
            "initramfs.img",
            f"initramfs-bcvk-{initrd.digest()}.img",
            "last-used",
            "lock",
            "rootfs.ext4",
            "vmlinuz",
        ]
    )
    # A later start needs no mount at all.
    again = rootfs.prepare("img", "sha256:" + "cd" * 32, block=True, mount=lambda: 1 / 0)  # type: ignore[arg-type,return-value]
    assert again.rootfs == first.rootfs


def test_prepare_without_block_builds_no_image(tmp_path: Path, cache: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    prepared = rootfs.prepare("img", "ef" * 32, block=False, mount=lambda: tree)
    assert prepared.rootfs is None
    assert prepared.label is None
    assert not (cache / ("ef" * 32) / "rootfs.ext4").exists()


def test_prune_spares_entries_in_use(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = make_tree(tmp_path / "tree")
    for image_id in ("aa" * 32, "bb" * 32, "cc" * 32):
        rootfs.prepare("img", image_id, block=False, mount=lambda: tree)
    monkeypatch.setattr(rootfs, "_present_ids", lambda: {"bb" * 32, "cc" * 32})
    old = time.time() - 40 * 86400
    os.utime(cache / ("cc" * 32) / "last-used", (old, old))
    with paths.locked(cache / ("bb" * 32) / "lock"):
        infos = {i.image_id: i for i in rootfs.describe()}
        assert infos["bb" * 32].in_use
        assert not infos["aa" * 32].in_use
        assert not infos["aa" * 32].image_present
        dry = rootfs.prune(older_than_days=30, everything=False, dry_run=True)
        assert sorted(i.image_id for i in dry) == ["aa" * 32, "cc" * 32]
        assert (cache / ("aa" * 32)).exists()
        everything = rootfs.prune(older_than_days=None, everything=True, dry_run=False)
        assert sorted(i.image_id for i in everything) == ["aa" * 32, "cc" * 32]
    assert [p.name for p in cache.iterdir()] == ["bb" * 32]
