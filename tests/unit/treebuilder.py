"""Build synthetic image trees and initramfs archives for hermetic tests."""

from __future__ import annotations

import gzip
from pathlib import Path


def newc(entries: list[tuple[str, bytes]]) -> bytes:
    """A cpio "newc" archive of regular files (what dracut writes)."""
    out = bytearray()

    def pad() -> None:
        while len(out) % 4:
            out.append(0)

    for ino, (name, data) in enumerate([*entries, ("TRAILER!!!", b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = [ino, 0o100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out += b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
        out += encoded
        pad()
        out += data
        pad()
    return bytes(out)


def initramfs(names: list[str], *, early: list[str] | None = None) -> bytes:
    main = gzip.compress(newc([(n, b"x") for n in names]))
    if early is None:
        return main
    return newc([(n, b"u") for n in early]) + b"\0" * 16 + main


DRACUT_FILES = [
    "init",
    "usr/lib/systemd/systemd",
    "usr/lib/modules/6.1.0-1/kernel/fs/fuse/virtiofs.ko.xz",
    "usr/lib/modules/6.1.0-1/kernel/fs/9p/9p.ko",
    "usr/lib/modules/6.1.0-1/kernel/net/9p/9pnet_virtio.ko",
    "usr/lib/modules/6.1.0-1/kernel/drivers/block/virtio_blk.ko",
    "usr/lib/modules/6.1.0-1/kernel/fs/overlayfs/overlay.ko.zst",
    "usr/lib/modules/6.1.0-1/kernel/fs/xfs/xfs.ko",
    "usr/lib/modules/6.1.0-1/kernel/fs/btrfs/btrfs.ko",
]


def write(root: Path, path: str, text: str = "") -> Path:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return target


def link(root: Path, path: str, target: str) -> None:
    where = root / path.lstrip("/")
    where.parent.mkdir(parents=True, exist_ok=True)
    where.symlink_to(target)


def bootc_tree(root: Path, *, kver: str = "6.1.0-1", sshd: bool = True) -> Path:
    """A Debian-like bootc tree: usrmerge symlinks, systemd, sshd, one kernel."""
    for d in ("bin", "sbin", "lib"):
        link(root, d, f"usr/{d}")
    write(root, "/usr/lib/os-release", 'ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian 12"\n')
    link(root, "/etc/os-release", "../usr/lib/os-release")
    write(root, "/usr/lib/systemd/systemd", "elf")
    write(root, "/usr/lib/x86_64-linux-gnu/systemd/libsystemd-shared-252.so", "elf")
    link(root, "/usr/sbin/init", "/lib/systemd/systemd")
    link(root, "/usr/lib/systemd/system/default.target", "graphical.target")
    write(root, f"/usr/lib/modules/{kver}/vmlinuz", "kernel")
    write(root, f"/usr/lib/modules/{kver}/modules.builtin", "kernel/fs/ext4/ext4.ko\n")
    (root / f"usr/lib/modules/{kver}/initramfs.img").write_bytes(initramfs(DRACUT_FILES))
    write(root, "/usr/bin/dracut", "#!/bin/sh")
    if sshd:
        write(root, "/usr/sbin/sshd", "elf")
        write(root, "/usr/lib/systemd/system/ssh.service", "[Unit]")
        link(
            root,
            "/etc/systemd/system/multi-user.target.wants/ssh.service",
            "/lib/systemd/system/ssh.service",
        )
    return root
