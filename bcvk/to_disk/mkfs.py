"""Root filesystems from an image tree, each with its own mkfs: no mount.

ext4: ``mkfs.ext4 -d`` then ``debugfs -w`` writes bcvk's files (fstab, keys…).
xfs: ``mkfs.xfs -p`` with a protofile generated from the tree plus those
files, then ``xfs_db`` restores sticky bits.  btrfs: ``mkfs.btrfs --rootdir``
of a staged copy of the tree plus those files (btrfs-progs has no offline
writer).  What each tool cannot keep is listed by ``loss_warning``; the table
of verified facts is in ``bcvk.image.scan``.

Tree-reading steps run where the image mount is visible (``bcvk.image.inns``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bcvk import run
from bcvk.errors import BcvkError
from bcvk.host import podman
from bcvk.image import inns
from bcvk.image.scan import Loss
from bcvk.to_disk import treecopy
from bcvk.to_disk.layout import Filesystem
from bcvk.to_disk.treecopy import Extra


@dataclass(frozen=True)
class RootSpec:
    tree: Path  # the mounted image
    uuid: str  # filesystem UUID
    extras: Sequence[Extra]
    existing: dict[str, str]  # facts["existing"]: what the tree has at bcvk's paths


def in_namespace(argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """ARGV run where the image mount is visible (podman's user namespace)."""
    return podman.unshare_argv([os.fspath(a) for a in argv])


def _mke2fs_features() -> list[str]:
    # e2fsprogs ≥ 1.47 enables orphan_file, which e2fsck < 1.47 (e.g. in
    # CentOS Stream 9 or Debian 11 guests) refuses to check at boot.
    version = run.run([run.require("mkfs.ext4", *run.sbin("mkfs.ext4")), "-V"], check=False).stderr
    words = version.split()
    if len(words) >= 2:
        try:
            major, minor = (int(x) for x in words[1].split(".")[:2])
        except ValueError:
            return []
        if (major, minor) >= (1, 47):
            return ["-O", "^orphan_file"]
    return []


def _quoted(path: str) -> str:
    # debugfs splits its script at blanks outside double quotes and knows no
    # escapes: a quote or a line break in a path would end or inject a command.
    if '"' in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ValueError(f"path {path!r} cannot be written in a debugfs script")
    return f'"{path}"'


def debugfs_script(extras_: Sequence[Extra], existing: dict[str, str]) -> str:
    """debugfs commands that put EXTRAS into an ext4 image (pure).

    The sources are bcvk's own staging files (``stage_dir``), never a path
    derived from OUTPUT; every path is refused rather than misquoted.
    """
    lines: list[str] = []
    for extra in extras_:
        path = _quoted(extra.path)
        if extra.kind == "dir":
            if existing.get(extra.path) == "dir":
                continue
            lines.append(f"mkdir {path}")
            kind = 0o040000
        else:
            if existing.get(extra.path, "missing") != "missing":
                lines.append(f"rm {path}")
            lines.append(f"write {_quoted(extra.source or '')} {path}")
            kind = 0o100000
        lines += [
            f"set_inode_field {path} mode 0{kind | extra.mode:o}",
            f"set_inode_field {path} uid {extra.uid}",
            f"set_inode_field {path} gid {extra.gid}",
        ]
    return "\n".join(lines) + "\n"


def build_ext4(spec: RootSpec, target: Path, work: Path) -> None:
    mkfs = run.require("mkfs.ext4", *run.sbin("mkfs.ext4"), why="to build an ext4 root filesystem")
    argv: list[str | os.PathLike[str]] = [
        mkfs, "-q", "-F", "-t", "ext4", "-U", spec.uuid, "-L", "root",
        *_mke2fs_features(), "-d", spec.tree, target,
    ]  # fmt: skip
    run.run(in_namespace(argv))
    script = work / "debugfs.cmds"
    script.write_text(debugfs_script(spec.extras, spec.existing))
    debugfs = run.require(
        "debugfs", *run.sbin("debugfs"), why="to add fstab and keys to the ext4 root"
    )
    result = run.run([debugfs, "-w", "-f", script, target])
    # debugfs reports failed commands on stderr but still exits 0.
    errors = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith("debugfs ")
    ]
    if errors:
        raise BcvkError(
            "could not add bcvk's files to the ext4 root: " + "; ".join(errors[:3]),
            hint="this is a bug in bcvk; rerun with --debug and report it",
        )


def build_xfs(spec: RootSpec, target: Path, work: Path) -> None:
    mkfs = run.require("mkfs.xfs", *run.sbin("mkfs.xfs"), why="to build an xfs root filesystem")
    proto = work / "xfs.proto"
    extras_file = work / "extras.json"
    extras_file.write_text(json.dumps([e.to_json() for e in spec.extras]))
    sticky = inns.call(treecopy.protofile_json, spec.tree, extras_file, proto)["sticky"]
    argv: list[str | os.PathLike[str]] = [
        mkfs,
        "-q",
        "-f",
        "-m",
        f"uuid={spec.uuid}",
        "-L",
        "root",
        "-p",
        proto,
        target,
    ]
    run.run(in_namespace(argv))
    if sticky:
        # The protofile's 3-digit modes cannot carry the sticky bit.
        xfs_db = run.require("xfs_db", *run.sbin("xfs_db"), why="to restore sticky bits on xfs")
        cmds: list[str] = []
        for path in sticky:
            cmds += ["-c", f"path {path}", "-c", "print core.mode"]
        modes = run.output([xfs_db, "-r", *cmds, target]).splitlines()
        writes: list[str] = []
        for path, line in zip(sticky, modes, strict=True):
            mode = int(line.split("=")[1].strip(), 8) | 0o1000
            writes += ["-c", f"path {path}", "-c", f"write core.mode 0{mode:o}"]
        run.run([xfs_db, "-x", *writes, target])


def build_btrfs(spec: RootSpec, target: Path, work: Path) -> None:
    mkfs = run.require(
        "mkfs.btrfs", *run.sbin("mkfs.btrfs"), why="to build a btrfs root filesystem"
    )
    stage = work / "stage"
    stage.mkdir()
    extras_file = work / "extras.json"
    extras_file.write_text(json.dumps([e.to_json() for e in spec.extras]))
    try:
        inns.call(treecopy.stage_json, spec.tree, stage, extras_file)
        argv: list[str | os.PathLike[str]] = [
            mkfs,
            "-q",
            "-f",
            "-U",
            spec.uuid,
            "-L",
            "root",
            "--rootdir",
            stage,
            target,
        ]
        run.run(in_namespace(argv))
    finally:
        remove_tree(stage)


def remove_tree(path: Path) -> None:
    """Remove PATH, which may hold files owned by the image's (sub)uids."""
    if not os.path.lexists(path):
        return
    if podman.rootless():
        run.run(in_namespace(["rm", "-rf", "--one-file-system", path]), check=False)
    shutil.rmtree(path, ignore_errors=True)


BUILDERS: dict[Filesystem, Callable[[RootSpec, Path, Path], None]] = {
    Filesystem.ext4: build_ext4,
    Filesystem.xfs: build_xfs,
    Filesystem.btrfs: build_btrfs,
}


def loss_warning(filesystem: Filesystem, loss: Loss, limit: int = 10) -> str | None:
    """One warning that lists exactly what FILESYSTEM could not carry over."""
    parts: list[str] = []
    labels = {
        "xattrs": "extended attributes (incl. file capabilities) dropped",
        "hard_links": "hard links turned into separate copies",
        "device_nodes": "device nodes whose major:minor became 0:0 or are missing",
        "unnamed": "files skipped: their names contain blanks or ':'/'$' the protofile "
        "format cannot spell",
        "other": "other",
    }
    for kind, label in labels.items():
        items: list[str] = getattr(loss, kind)
        if items:
            shown = "\n    ".join(items[:limit])
            more = f"\n    … and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"  {label} ({len(items)}):\n    {shown}{more}")
    if not parts:
        return None
    text = f"{filesystem.tool} cannot preserve everything in this image; lost in the disk:\n"
    text += "\n".join(parts)
    if filesystem is Filesystem.xfs:
        text += "\n  (timestamps are set to the build time; use --filesystem ext4 to keep all)"
    else:
        text += "\n  (use --filesystem ext4 to keep everything)"
    return text
