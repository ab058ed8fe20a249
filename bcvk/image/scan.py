"""Walking an image tree: its size, and what a filesystem tool would lose of it.

Runs where the image mount is visible (``bcvk.image.inns``); nothing here
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
import enum
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bcvk.image import inns


class LossKind(enum.StrEnum):
    """What a filesystem tool may fail to carry over (each filesystem says which it loses)."""

    xattrs = "xattrs"  # extended attributes, file capabilities
    hard_links = "hard_links"
    device_nodes = "device_nodes"
    unnamed = "unnamed"  # names a protofile cannot spell


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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TreeScan:
        return cls(data["content_bytes"], data["files"], Loss(**data["loss"]))


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


PROTOFILE_BLANKS = set(" \t\n\r\v\f")


def proto_unnamable(name: str) -> bool:
    """Names the xfsprogs 6.1 protofile parser cannot express."""
    return bool(PROTOFILE_BLANKS & set(name)) or name == "$" or name.startswith(":")


def scan(root: Path, losses: frozenset[LossKind] = frozenset()) -> TreeScan:
    """Size the tree, and list the entries a tool losing LOSSES would drop or change."""
    result = TreeScan()
    links: dict[tuple[int, int], list[str]] = {}
    xattrs = LossKind.xattrs in losses
    unnamed = LossKind.unnamed in losses
    for path, st in walk(root):
        result.files += 1
        result.content_bytes += _block(st.st_size) if stat.S_ISREG(st.st_mode) else 4096
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            links.setdefault((st.st_dev, st.st_ino), []).append(path)
        if LossKind.device_nodes in losses and (
            stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        ):
            kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
            result.loss.device_nodes.append(
                f"{path} ({kind} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)})"
            )
        if unnamed and proto_unnamable(path.rsplit("/", 1)[1]):
            result.loss.unnamed.append(path)
        if xattrs:
            try:
                names = os.listxattr(root / path.lstrip("/"), follow_symlinks=False)
            except OSError:
                names = []
            if names:
                result.loss.xattrs.append(f"{path} ({', '.join(sorted(names))})")
    if LossKind.hard_links in losses:
        result.loss.hard_links = [" = ".join(group) for group in links.values() if len(group) > 1]
    return result


@inns.entry
def scan_json(root: str, losses: str) -> dict[str, Any]:
    """``scan`` for ``inns.call``: LOSSES comma-separated."""
    kinds = frozenset(LossKind(k) for k in losses.split(",") if k)
    return dataclasses.asdict(scan(Path(root), kinds))
