from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bcvk.image import facts as image_facts
from bcvk.image import initramfs
from bcvk.image import tree as imagetree
from bcvk.image.facts import TreeFacts

from .treebuilder import DRACUT_FILES, bootc_tree, link, newc, write
from .treebuilder import initramfs as make_initramfs


def test_resolve_follows_absolute_links_inside_root(tmp_path: Path) -> None:
    root = bootc_tree(tmp_path)
    # /sbin -> usr/sbin, /usr/sbin/init -> /lib/systemd/systemd, /lib -> usr/lib
    resolved = imagetree.resolve(root, "/sbin/init")
    assert resolved == root / "usr/lib/systemd/systemd"


def test_resolve_never_escapes_to_host(tmp_path: Path) -> None:
    link(tmp_path, "/etc/passwd", "/../../../../etc/passwd")
    assert imagetree.resolve(tmp_path, "/etc/passwd") is None


def test_resolve_symlink_loop(tmp_path: Path) -> None:
    link(tmp_path, "/a", "/b")
    link(tmp_path, "/b", "/a")
    assert imagetree.resolve(tmp_path, "/a") is None


def test_probe_debian_like_tree(tmp_path: Path) -> None:
    facts = image_facts.probe(bootc_tree(tmp_path))
    assert facts.os_release["ID"] == "debian"
    assert facts.os_release["VERSION_ID"] == "12"
    assert [(k.version, k.kind) for k in facts.kernels] == [("6.1.0-1", "vmlinuz")]
    assert facts.kernels[0].initramfs == "/usr/lib/modules/6.1.0-1/initramfs.img"
    assert facts.init == "systemd"
    assert facts.systemd_version == 252
    assert facts.sshd_installed
    assert facts.sshd_enabled
    assert facts.default_target == "graphical.target"
    assert facts.initramfs_generator == "dracut"
    assert facts.initramfs == {
        "virtiofs": True,
        "9p": True,
        "virtio_blk": True,
        "ext4": True,  # built in, from modules.builtin
        "xfs": True,
        "btrfs": True,
        "overlay": True,
        "systemd": True,
        "initramfs_tools": False,
    }
    assert not facts.has_bootc


def test_probe_round_trips_through_json(tmp_path: Path) -> None:
    facts = image_facts.probe(bootc_tree(tmp_path))
    assert TreeFacts.from_json(facts.to_json()) == facts


def test_uki_found_first_and_counts_as_kernel(tmp_path: Path) -> None:
    root = bootc_tree(tmp_path)
    write(root, "/usr/lib/modules/6.1.0-1/6.1.0-1.efi", "uki")
    facts = image_facts.probe(root)
    assert [(k.version, k.kind) for k in facts.kernels] == [("6.1.0-1", "uki")]


def test_two_kernels(tmp_path: Path) -> None:
    root = bootc_tree(tmp_path)
    shutil.copytree(root / "usr/lib/modules/6.1.0-1", root / "usr/lib/modules/6.1.0-2")
    assert [k.version for k in image_facts.probe(root).kernels] == ["6.1.0-1", "6.1.0-2"]


def test_sshd_not_enabled(tmp_path: Path) -> None:
    root = bootc_tree(tmp_path)
    (root / "etc/systemd/system/multi-user.target.wants/ssh.service").unlink()
    facts = image_facts.probe(root)
    assert facts.sshd_installed
    assert not facts.sshd_enabled


def test_sshd_enabled_by_preset(tmp_path: Path) -> None:
    root = bootc_tree(tmp_path)
    (root / "etc/systemd/system/multi-user.target.wants/ssh.service").unlink()
    write(root, "/usr/lib/systemd/system-preset/90-default.preset", "enable sshd.service\n")
    assert image_facts.probe(root).sshd_enabled


def test_initramfs_with_early_microcode_archive(tmp_path: Path) -> None:
    image = tmp_path / "initrd"
    image.write_bytes(make_initramfs(DRACUT_FILES, early=["kernel/x86/microcode/GenuineIntel.bin"]))
    names = initramfs.list_files(image)
    assert names is not None
    assert "kernel/x86/microcode/GenuineIntel.bin" in names
    assert "usr/lib/systemd/systemd" in names


def test_initramfs_tools_style_has_no_systemd(tmp_path: Path) -> None:
    image = tmp_path / "initrd"
    image.write_bytes(newc([("init", b"#!/bin/sh"), ("lib/modules/x/virtio_blk.ko", b"")]))
    caps = initramfs.capabilities(image)
    assert caps["virtio_blk"]
    assert not caps["systemd"]
    assert not caps["virtiofs"]


def test_initramfs_unknown_format(tmp_path: Path) -> None:
    image = tmp_path / "initrd"
    image.write_bytes(b"\x89PNG not an initramfs")
    assert initramfs.capabilities(image) == {}


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("a/b/virtio_blk.ko.xz", "virtio_blk"),
        ("a/9pnet-virtio.ko", "9pnet_virtio"),
        ("a/overlay.ko.zst", "overlay"),
        ("a/README", None),
    ],
)
def test_module_names(name: str, module: str | None) -> None:
    assert initramfs._module_name(name) == module
