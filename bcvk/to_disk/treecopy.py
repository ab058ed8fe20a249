"""Copies of an image tree for the filesystems whose mkfs cannot add files later.

ext4 gets bcvk's files with debugfs after ``mkfs.ext4 -d``; xfs and btrfs
cannot, so bcvk either describes tree plus files in an ``mkfs.xfs -p``
protofile, or stages a copy of the tree with its files for
``mkfs.btrfs --rootdir``.  These run where the image mount is visible
(``bcvk.image.inns``) and never write into the image.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bcvk.image import inns
from bcvk.image.scan import PROTOFILE_BLANKS, proto_unnamable, walk


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
        if stat.S_ISREG(st.st_mode) and PROTOFILE_BLANKS & set(os.fspath(root)):
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


@inns.entry
def protofile_json(root: str, extras_file: str, out: str) -> dict[str, list[str]]:
    """Write the protofile of ROOT plus the extras listed in EXTRAS_FILE to OUT."""
    extras = extras_from_json(json.loads(Path(extras_file).read_text()))
    text, sticky = protofile(Path(root), extras)
    Path(out).write_text(text)
    return {"sticky": sticky}


@inns.entry
def stage_json(src: str, dst: str, extras_file: str) -> dict[str, list[str]]:
    """Copy the tree SRC into DST and add the extras listed in EXTRAS_FILE."""
    failed = copy_tree(Path(src), Path(dst))
    apply_extras(Path(dst), extras_from_json(json.loads(Path(extras_file).read_text())))
    return {"failed_device_nodes": failed}
