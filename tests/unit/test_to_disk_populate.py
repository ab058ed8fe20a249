"""Reading trees for disks: facts, loss scans, xfs protofiles, staged copies."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from bcvk.image import scan as populate


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


def test_facts(tree: Path) -> None:
    facts = populate.facts(tree, "x86_64")
    assert facts["os_release"] == {"ID": "testos", "PRETTY_NAME": "Test OS 1"}
    assert facts["install_filesystem"] == "xfs"
    assert facts["image_kargs"] == ["mitigations=auto", "quiet"]
    assert facts["has_bootc"] is False
    assert facts["selinux"] is False
    assert facts["systemd_boot"] is None
    assert facts["kernel_files"] == [
        {
            "kernel": str(tree / "usr/lib/modules/6.1.0-1/vmlinuz"),
            "initrd": str(tree / "usr/lib/modules/6.1.0-1/initramfs.img"),
        }
    ]
    existing = facts["existing"]
    assert isinstance(existing, dict)
    assert existing["/etc/fstab"] == "other"
    assert existing["/etc"] == "dir"
    assert existing["/root"] == "missing"


def test_scan_for_xfs_lists_what_the_protofile_loses(tree: Path) -> None:
    result = populate.scan(tree, "xfs")
    assert result.content_bytes > 0
    # a hard link shares its inode's xattrs
    assert result.loss.xattrs == [
        "/usr/bin/tool (user.bcvk-test)",
        "/usr/bin/tool-alias (user.bcvk-test)",
    ]
    assert result.loss.hard_links == ["/usr/bin/tool = /usr/bin/tool-alias"]
    assert sorted(result.loss.unnamed) == ["/:colon", "/with space.txt"]


def test_scan_for_ext4_loses_nothing(tree: Path) -> None:
    assert populate.scan(tree, "ext4").loss.empty()


def test_protofile_golden(tree: Path, golden: Callable[[str, str], None]) -> None:
    extras = [
        populate.Extra("/etc/fstab", "file", 0o644, "/extras/fstab"),
        populate.Extra("/boot", "dir", 0o755),
        populate.Extra("/boot/efi", "dir", 0o700),
    ]
    text, sticky = populate.protofile(tree, extras)
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
    assert populate.copy_tree(tree, dst) == []
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
    populate.apply_extras(
        tree,
        [
            populate.Extra("/etc/fstab", "file", 0o644, str(source), os.getuid(), os.getgid()),
            populate.Extra("/root", "dir", 0o700, None, os.getuid(), os.getgid()),
        ],
    )
    assert (tree / "etc" / "fstab").read_text() == "new\n"
    assert stat.S_IMODE((tree / "root").stat().st_mode) == 0o700


def test_unnamable_names() -> None:
    assert populate.proto_unnamable("a b")
    assert populate.proto_unnamable("$")
    assert populate.proto_unnamable(":x")
    assert not populate.proto_unnamable("a$b")


def test_main_prints_json(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert populate.main(["facts", str(tree), "x86_64"]) == 0
    assert '"install_filesystem": "xfs"' in capsys.readouterr().out
    assert populate.main(["nope"]) == 2
