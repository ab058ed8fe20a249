"""Reading trees for disks: facts, loss scans, xfs protofiles, staged copies."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from bcvk.errors import ImageContentError
from bcvk.image import bootc
from bcvk.image import scan as populate
from bcvk.image.facts import TreeFacts
from bcvk.image.scan import TreeScan
from bcvk.to_disk import native, treecopy
from bcvk.to_disk.layout import Filesystem
from bcvk.to_disk.treecopy import Extra


def make_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text('ID=testos\nPRETTY_NAME="Test OS 1"\n')
    (root / "etc" / "fstab").write_text("# empty\n")
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    (root / "usr" / "bin" / "tool").chmod(0o4755)
    os.link(root / "usr" / "bin" / "tool", root / "usr" / "bin" / "tool-alias")
    (root / "usr" / "bin" / "sh").symlink_to("tool")
    os.setxattr(root / "usr" / "bin" / "tool", "user.bcvk-test", b"value")
    (root / "with space.txt").write_text("x")
    (root / ":colon").write_text("x")
    os.mkfifo(root / "fifo")
    kdir = root / "usr" / "lib" / "modules" / "6.1.0-1"
    kdir.mkdir(parents=True)
    (kdir / "vmlinuz").write_bytes(b"kernel")
    (kdir / "initramfs.img").write_bytes(b"initrd")
    (root / "usr" / "lib" / "bootc" / "install").mkdir(parents=True)
    (root / "usr" / "lib" / "bootc" / "install" / "00-fs.toml").write_text(
        '[install.filesystem.root]\ntype = "xfs"\n'
    )
    kargs = root / "usr" / "lib" / "bootc" / "kargs.d"
    kargs.mkdir()
    (kargs / "10-a.toml").write_text('kargs = ["mitigations=auto", "quiet"]\n')
    (kargs / "20-arm.toml").write_text('kargs = ["arm-only"]\nmatch-architectures = ["aarch64"]\n')
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")


def test_read_the_tree_for_a_disk(tree: Path) -> None:
    read = native.read(tree, "localhost/x")
    facts, located = read.facts, read.located
    assert facts.os_release == {"ID": "testos", "PRETTY_NAME": "Test OS 1"}
    assert facts.install_filesystem == "xfs"
    assert facts.image_kargs == ("mitigations=auto", "quiet")
    assert facts.has_bootc is False
    assert facts.selinux is False
    assert located.systemd_boot is None
    assert located.kernel == str(tree / "usr/lib/modules/6.1.0-1/vmlinuz")
    assert located.initrd == str(tree / "usr/lib/modules/6.1.0-1/initramfs.img")
    assert located.existing["/etc/fstab"] == "other"
    assert located.existing["/etc"] == "dir"
    assert located.existing["/root"] == "missing"


def test_the_tree_travels_as_json(tree: Path) -> None:
    # What crosses the user-namespace boundary when rootless.
    data = json.loads(json.dumps(native.read_json(os.fspath(tree), "x86_64")))
    assert TreeFacts.from_json(data["facts"]) == native.read(tree, "x").facts


def test_scan_for_xfs_lists_what_the_protofile_loses(tree: Path) -> None:
    result = populate.scan(tree, Filesystem.xfs.losses)
    assert result.content_bytes > 0
    # a hard link shares its inode's xattrs
    assert result.loss.xattrs == [
        "/usr/bin/tool (user.bcvk-test)",
        "/usr/bin/tool-alias (user.bcvk-test)",
    ]
    assert result.loss.hard_links == ["/usr/bin/tool = /usr/bin/tool-alias"]
    assert sorted(result.loss.unnamed) == ["/:colon", "/with space.txt"]


def test_scan_for_ext4_loses_nothing(tree: Path) -> None:
    assert populate.scan(tree, Filesystem.ext4.losses).loss.empty()
    assert TreeScan.from_json(populate.scan_json(os.fspath(tree), "")).files > 0


def test_protofile_golden(tree: Path, golden: Callable[[str, str], None]) -> None:
    extras = [
        Extra("/etc/fstab", "file", 0o644, "/extras/fstab"),
        Extra("/boot", "dir", 0o755),
        Extra("/boot/efi", "dir", 0o700),
    ]
    text, sticky = treecopy.protofile(tree, extras)
    assert sticky == ["/tmp"]
    # owners come from the tree; make the golden independent of who runs it
    text = re.sub(r"^(\s*\S+ [-dlcbp][-u][-g]\d{3}) \d+ \d+", r"\1 UID GID", text, flags=re.M)
    text = text.replace(str(tree), "TREE")
    assert "with space" not in text
    assert ":colon" not in text
    golden("to-disk/xfs.proto", text)


def test_copy_tree_keeps_links_modes_and_xattrs(tree: Path, tmp_path: Path) -> None:
    dst = tmp_path / "copy"
    dst.mkdir()
    assert treecopy.copy_tree(tree, dst) == []
    tool = dst / "usr" / "bin" / "tool"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o4755
    assert tool.stat().st_ino == (dst / "usr" / "bin" / "tool-alias").stat().st_ino
    assert os.readlink(dst / "usr" / "bin" / "sh") == "tool"
    assert os.getxattr(tool, "user.bcvk-test") == b"value"
    assert stat.S_IMODE((dst / "tmp").stat().st_mode) == 0o1777
    assert stat.S_ISFIFO((dst / "fifo").lstat().st_mode)
    assert (dst / "with space.txt").read_text() == "x"
    assert (tree / "usr" / "bin" / "tool").stat().st_mtime == tool.stat().st_mtime


def test_apply_extras_replaces_and_creates(tree: Path, tmp_path: Path) -> None:
    source = tmp_path / "fstab"
    source.write_text("new\n")
    treecopy.apply_extras(
        tree,
        [
            Extra("/etc/fstab", "file", 0o644, str(source), os.getuid(), os.getgid()),
            Extra("/root", "dir", 0o700, None, os.getuid(), os.getgid()),
        ],
    )
    assert (tree / "etc" / "fstab").read_text() == "new\n"
    assert stat.S_IMODE((tree / "root").stat().st_mode) == 0o700


def test_unnamable_names() -> None:
    assert populate.proto_unnamable("a b")
    assert populate.proto_unnamable("$")
    assert populate.proto_unnamable(":x")
    assert not populate.proto_unnamable("a$b")


def test_a_karg_string_in_a_dropin_is_refused_not_split(tree: Path) -> None:
    (tree / "usr/lib/bootc/kargs.d/30-bad.toml").write_text('kargs = "console=ttyS0"\n')
    with pytest.raises(ImageContentError, match="kargs must be a list of strings"):
        bootc.image_kargs(tree, "x86_64")
