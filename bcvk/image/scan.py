"""Reading an image tree for a disk: facts, loss reports, xfs protofiles.

The functions that read the tree run where the image mount is visible: in
this process when root, else inside ``podman unshare`` through
``python -m bcvk.image.scan COMMAND ARGS`` which prints JSON.  Nothing here
writes into the tree.

What each filesystem tool keeps (verified on Debian 12: e2fsprogs 1.47.0,
xfsprogs 6.1.0, btrfs-progs 6.2):

=========================  =======  ===============  ======================
                           ext4 -d  btrfs --rootdir  xfs protofile
=========================  =======  ===============  ======================
owners, modes, suid/sgid   yes      yes              yes
sticky bit                 yes      yes              no (bcvk fixes: xfs_db)
xattrs, file capabilities  yes      yes              no  (listed as lost)
hard links                 yes      yes              no  (become copies)
symlinks, fifos            yes      yes              yes
device nodes               yes      no (rdev 0,0)    yes
names with blanks          yes      yes              no  (skipped, listed)
timestamps                 yes      yes              no  (build time)
=========================  =======  ===============  ======================
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import sys
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bcvk.image import tree as imagetree

# ------------------------------------------------------------------ extras


@dataclass(frozen=True)
class Extra:
    """A file or directory bcvk adds to (or replaces in) the root filesystem."""

    path: str  # absolute, inside the disk
    kind: str  # "file" or "dir"
    mode: int
    source: str | None = None  # host file with the content (kind == "file")
    uid: int = 0
    gid: int = 0

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def extras_from_json(data: Sequence[dict[str, object]]) -> list[Extra]:
    return [Extra(**item) for item in data]  # type: ignore[arg-type]


# ------------------------------------------------------------------ facts


@dataclass
class Loss:
    """What a filesystem tool could not carry over, by kind."""

    xattrs: list[str] = field(default_factory=list)  # "path (name, …)"
    hard_links: list[str] = field(default_factory=list)  # "a = b = c"
    device_nodes: list[str] = field(default_factory=list)
    unnamed: list[str] = field(default_factory=list)  # names the tool cannot spell
    other: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (
            self.xattrs or self.hard_links or self.device_nodes or self.unnamed or self.other
        )


@dataclass
class TreeScan:
    content_bytes: int = 0
    files: int = 0
    loss: Loss = field(default_factory=Loss)


def _block(n: int) -> int:
    return -(-n // 4096) * 4096


def walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(path inside the image, lstat) for every entry, parents before children."""
    stack = [""]
    while stack:
        rel = stack.pop()
        host = os.path.join(root, rel) if rel else os.fspath(root)
        try:
            entries = sorted(os.scandir(host), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            yield "/" + child, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)


_PROTO_BAD = set(" \t\n\r\v\f")


def proto_unnamable(name: str) -> bool:
    """Names the xfsprogs 6.1 protofile parser cannot express."""
    return bool(_PROTO_BAD & set(name)) or name == "$" or name.startswith(":")


def scan(root: Path, filesystem: str) -> TreeScan:
    """Size the tree and list what FILESYSTEM's tool will lose from it."""
    result = TreeScan()
    links: dict[tuple[int, int], list[str]] = {}
    for path, st in walk(root):
        result.files += 1
        result.content_bytes += _block(st.st_size) if stat.S_ISREG(st.st_mode) else 4096
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            links.setdefault((st.st_dev, st.st_ino), []).append(path)
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
            result.loss.device_nodes.append(
                f"{path} ({kind} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)})"
            )
        if filesystem == "xfs":
            name = path.rsplit("/", 1)[1]
            if proto_unnamable(name):
                result.loss.unnamed.append(path)
            try:
                names = os.listxattr(root / path.lstrip("/"), follow_symlinks=False)
            except OSError:
                names = []
            if names:
                result.loss.xattrs.append(f"{path} ({', '.join(sorted(names))})")
    if filesystem == "xfs":
        result.loss.hard_links = [" = ".join(group) for group in links.values() if len(group) > 1]
    if filesystem != "btrfs":
        result.loss.device_nodes = []
    return result


def _toml_dropins(root: Path, directory: str) -> Iterator[dict[str, Any]]:
    """The parseable ``DIRECTORY/*.toml`` files of the image, in name order.

    bootc skips what it cannot parse rather than failing the install; so do we.
    """
    found = imagetree.resolve(root, directory)
    if found is None or not found.is_dir():
        return
    for path in sorted(found.glob("*.toml")):
        try:
            yield tomllib.loads(path.read_text(errors="replace"))
        except tomllib.TOMLDecodeError:
            continue


def install_config(root: Path) -> dict[str, object]:
    """The merged ``/usr/lib/bootc/install/*.toml`` ``[install]`` table."""
    merged: dict[str, object] = {}
    for data in _toml_dropins(root, "/usr/lib/bootc/install"):
        install = data.get("install")
        if isinstance(install, dict):
            merged.update(install)
    return merged


def image_kargs(root: Path, arch: str) -> list[str]:
    """Kernel arguments the image ships in ``/usr/lib/bootc/kargs.d/*.toml``."""
    kargs: list[str] = []
    for data in _toml_dropins(root, "/usr/lib/bootc/kargs.d"):
        arches = data.get("match-architectures")
        if isinstance(arches, list) and arch not in arches:
            continue
        kargs += [str(k) for k in data.get("kargs", [])]
    return kargs


def facts(root: Path, arch: str) -> dict[str, object]:
    """Everything the disk builder needs to know about the tree, as JSON."""
    from bcvk.to_disk import bootloader

    text = imagetree.read_text(root, "/etc/os-release") or imagetree.read_text(
        root, "/usr/lib/os-release"
    )
    kernels = imagetree.find_kernels(root)

    def real(path: str | None) -> str | None:
        if path is None:
            return None
        found = imagetree.resolve(root, path)
        return os.fspath(found) if found is not None and found.is_file() else None

    boot = real(f"{bootloader.SYSTEMD_BOOT_DIR}/{bootloader.systemd_boot_name(arch)}")
    install = install_config(root)
    fs_type = None
    filesystem = install.get("filesystem")
    if isinstance(filesystem, dict):
        root_cfg = filesystem.get("root")
        if isinstance(root_cfg, dict) and isinstance(root_cfg.get("type"), str):
            fs_type = root_cfg["type"]
    existing = {}
    for path in (
        "/etc", "/etc/fstab", "/etc/machine-id", "/root", "/root/.ssh",
        "/root/.ssh/authorized_keys", "/boot", "/boot/efi", "/.autorelabel",
    ):  # fmt: skip
        host = root / path.lstrip("/")
        existing[path] = (
            "missing"
            if not os.path.lexists(host)
            else "dir"
            if host.is_dir() and not host.is_symlink()
            else "other"
        )
    return {
        "os_release": imagetree.parse_os_release(text or ""),
        "kernels": [dataclasses.asdict(k) for k in kernels],
        "kernel_files": [
            {"kernel": real(k.path), "initrd": real(k.initramfs) if k.initramfs else None}
            for k in kernels
        ],
        "systemd_boot": boot,
        "has_bootc": imagetree.resolve(root, "/usr/bin/bootc") is not None,
        "selinux": imagetree.has_selinux_policy(root),
        "install_filesystem": fs_type,
        "image_kargs": image_kargs(root, arch),
        "existing": existing,
    }


# ------------------------------------------------------------------ xfs


def _proto_mode(st_mode: int) -> str:
    if stat.S_ISDIR(st_mode):
        kind = "d"
    elif stat.S_ISLNK(st_mode):
        kind = "l"
    elif stat.S_ISCHR(st_mode):
        kind = "c"
    elif stat.S_ISBLK(st_mode):
        kind = "b"
    elif stat.S_ISFIFO(st_mode):
        kind = "p"
    else:
        kind = "-"
    suid = "u" if st_mode & stat.S_ISUID else "-"
    sgid = "g" if st_mode & stat.S_ISGID else "-"
    return f"{kind}{suid}{sgid}{st_mode & 0o777:03o}"


@dataclass
class _Node:
    mode: int
    uid: int
    gid: int
    extra: str = ""  # source path, link target or "maj min"
    children: dict[str, _Node] | None = None


def _node_for(host: Path, st: os.stat_result) -> _Node | None:
    if stat.S_ISDIR(st.st_mode):
        return _Node(st.st_mode, st.st_uid, st.st_gid, children={})
    if stat.S_ISREG(st.st_mode):
        return _Node(st.st_mode, st.st_uid, st.st_gid, os.fspath(host))
    if stat.S_ISLNK(st.st_mode):
        return _Node(st.st_mode, st.st_uid, st.st_gid, os.readlink(host))
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        rdev = st.st_rdev
        return _Node(st.st_mode, st.st_uid, st.st_gid, f"{os.major(rdev)} {os.minor(rdev)}")
    if stat.S_ISFIFO(st.st_mode):
        return _Node(st.st_mode, st.st_uid, st.st_gid)
    return None  # sockets are not files a filesystem image carries


def protofile(root: Path, extras: Sequence[Extra]) -> tuple[str, list[str]]:
    """An ``mkfs.xfs -p`` protofile for ROOT plus EXTRAS, and the sticky dirs.

    Entries the format cannot spell are left out (``scan`` lists them); the
    sticky bit does not fit its 3-digit modes, so sticky directories are
    returned for fixing up with xfs_db afterwards.
    """
    st = root.lstat()
    tree = _Node(st.st_mode, 0, 0, children={})
    index: dict[str, _Node] = {"": tree}
    sticky: list[str] = []
    if st.st_mode & stat.S_ISVTX:
        sticky.append("/")
    for path, st in walk(root):
        parent_path, name = path.rsplit("/", 1)
        parent = index.get(parent_path.lstrip("/"))
        if parent is None or parent.children is None or proto_unnamable(name):
            continue  # inside a skipped directory, or an unspellable name
        if stat.S_ISREG(st.st_mode) and _PROTO_BAD & set(os.fspath(root)):
            continue
        node = _node_for(root / path.lstrip("/"), st)
        if node is None:
            continue
        parent.children[name] = node
        if node.children is not None:
            index[path.lstrip("/")] = node
            if st.st_mode & stat.S_ISVTX:
                sticky.append(path)
    for extra in extras:
        parent_path, name = extra.path.rsplit("/", 1)
        parent = index.get(parent_path.lstrip("/"))
        if parent is None or parent.children is None:
            raise ValueError(f"parent of {extra.path} is not a directory in the tree")
        if extra.kind == "dir":
            existing = parent.children.get(name)
            if existing is not None and existing.children is not None:
                continue
            node = _Node(stat.S_IFDIR | extra.mode, extra.uid, extra.gid, children={})
            index[extra.path.lstrip("/")] = node
        else:
            assert extra.source is not None
            node = _Node(stat.S_IFREG | extra.mode, extra.uid, extra.gid, extra.source)
        parent.children[name] = node

    lines = ["/dev/null", "0 0"]

    def emit(node: _Node, depth: int) -> None:
        for name, child in sorted((node.children or {}).items()):
            mode = _proto_mode(child.mode)
            line = f"{' ' * depth}{name} {mode} {child.uid} {child.gid}"
            if child.extra:
                line += f" {child.extra}"
            lines.append(line)
            if child.children is not None:
                emit(child, depth + 1)
                lines.append(f"{' ' * depth}$")

    lines.append(f"{_proto_mode(tree.mode)} 0 0")
    emit(tree, 1)
    lines.append("$")
    return "\n".join(lines) + "\n", sticky


# ------------------------------------------------------------------ staged copy


def copy_tree(src: Path, dst: Path) -> list[str]:
    """Copy SRC into the empty directory DST keeping owners, modes, xattrs,
    times and hard links; return the device nodes that could not be made."""
    failed: list[str] = []
    seen: dict[tuple[int, int], str] = {}
    dirs: list[tuple[str, os.stat_result]] = []
    _copy_meta(src, dst, src.lstat())
    for path, st in walk(src):
        s = os.path.join(src, path.lstrip("/"))
        d = os.path.join(dst, path.lstrip("/"))
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(d, 0o700)
            dirs.append((path, st))
            continue
        if stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in seen:
                os.link(seen[key], d)
                continue
            shutil.copyfile(s, d, follow_symlinks=False)
            seen[key] = d
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(s), d)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(d)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            try:
                os.mknod(d, mode, st.st_rdev)
            except PermissionError:
                failed.append(path)
                continue
        else:
            continue
        _copy_meta(Path(s), Path(d), st)
    for path, st in reversed(dirs):
        _copy_meta(src / path.lstrip("/"), dst / path.lstrip("/"), st)
    return failed


def _copy_meta(src: Path, dst: Path, st: os.stat_result) -> None:
    link = stat.S_ISLNK(st.st_mode)
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        names = []
    for name in names:
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False),
                        follow_symlinks=False)  # fmt: skip
        except OSError:
            if not name.startswith(("trusted.", "security.selinux")):
                raise
    if not link:
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def apply_extras(root: Path, extras: Sequence[Extra]) -> None:
    """Write EXTRAS into a staged (copied) tree ROOT."""
    for extra in extras:
        target = root / extra.path.lstrip("/")
        if extra.kind == "dir":
            if not target.is_dir() or target.is_symlink():
                if os.path.lexists(target):
                    target.unlink()
                target.mkdir()
        else:
            if os.path.lexists(target) and not target.is_dir():
                target.unlink()
            assert extra.source is not None
            shutil.copyfile(extra.source, target)
        os.chown(target, extra.uid, extra.gid)
        os.chmod(target, extra.mode)


# ------------------------------------------------------------------ entry


def dispatch(argv: Sequence[str]) -> object:
    """``facts ROOT ARCH`` | ``scan ROOT FS`` | ``protofile ROOT EXTRAS OUT``
    | ``stage SRC DST EXTRAS`` → a JSON-able result."""
    command, args = argv[0], list(argv[1:])
    if command == "facts":
        return facts(Path(args[0]), args[1])
    if command == "scan":
        return dataclasses.asdict(scan(Path(args[0]), args[1]))
    if command == "protofile":
        extras = extras_from_json(json.loads(Path(args[1]).read_text()))
        text, sticky = protofile(Path(args[0]), extras)
        Path(args[2]).write_text(text)
        return {"sticky": sticky}
    if command == "stage":
        failed = copy_tree(Path(args[0]), Path(args[1]))
        apply_extras(Path(args[1]), extras_from_json(json.loads(Path(args[2]).read_text())))
        return {"failed_device_nodes": failed}
    raise ValueError(f"unknown command {command}")


def main(argv: list[str]) -> int:
    """Run inside podman's user namespace: print ``dispatch``'s result as JSON."""
    try:
        result = dispatch(argv)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
