"""What an ephemeral VM needs from an image, prepared once per image and cached.

``cache_dir()/images/<image id>/`` holds the image's facts, its kernel and
initramfs (copied out, or extracted from a UKI) and, for the block transport,
``rootfs.ext4``: a read-only ext4 image of the root filesystem made with
``mkfs.ext4 -d``.  Every later VM of the same image reuses them.  ``warm/``
holds the image's warm-start snapshots (``bcvk.ephemeral.warm``): one saved
machine per configuration, ``KEY.state`` with ``KEY.json`` beside it.

Entries are built under an exclusive ``flock`` to a temporary name and then
renamed, so two VMs starting at once build once and never see half a file.
When rootless, the image mount exists only inside podman's user namespace;
the work that reads the tree runs there (``bcvk.image.inns``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bcvk import paths, run
from bcvk.ephemeral import registry as state
from bcvk.errors import BcvkError, CommandError
from bcvk.guest import initrd as guest_initrd
from bcvk.host import podman
from bcvk.image import inns, tree
from bcvk.image.facts import TreeFacts, probe
from bcvk.image.tree import Kernel, resolve
from bcvk.image.uki import extract_uki
from bcvk.log import logger

FACTS = "facts.json"
KERNEL = "vmlinuz"
INITRD = "initramfs.img"
ROOTFS = "rootfs.ext4"
USED = "last-used"
META = "image.json"
LOCK = "lock"
WARM = "warm"
# Bumped when the layout, the facts or the way rootfs.ext4 is made change.
FORMAT = 4


def cache_root() -> Path:
    return paths.cache_dir() / "images"


def label_for(image_id: str) -> str:
    """The ext4 label (at most 16 bytes) the guest finds its root by."""
    return "bcvk-" + image_id.removeprefix("sha256:")[:11]


@dataclass(frozen=True)
class Entry:
    path: Path

    @property
    def image_id(self) -> str:
        return self.path.name

    @property
    def kernel(self) -> Path:
        return self.path / KERNEL

    @property
    def initrd(self) -> Path:
        return self.path / INITRD

    @property
    def rootfs(self) -> Path:
        return self.path / ROOTFS

    @property
    def lock(self) -> Path:
        return self.path / LOCK

    @property
    def warm(self) -> Path:
        return self.path / WARM

    def facts(self) -> TreeFacts | None:
        try:
            data = json.loads((self.path / FACTS).read_text())
            if data.pop("bcvk_format", None) != FORMAT:
                return None
            return TreeFacts.from_json(data)
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def meta(self) -> dict[str, object]:
        try:
            data = json.loads((self.path / META).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def last_used(self) -> float:
        for name in (USED, FACTS):
            with contextlib.suppress(OSError):
                return (self.path / name).stat().st_mtime
        return 0.0

    def touch(self) -> None:
        (self.path / USED).touch()

    def size(self) -> int:
        total = 0
        for child in (*self.path.iterdir(), *_children(self.warm)):
            with contextlib.suppress(OSError):
                total += child.stat().st_blocks * 512
        return total


def _children(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []


def entry_for(image_id: str) -> Entry:
    return Entry(cache_root() / image_id.removeprefix("sha256:"))


@dataclass(frozen=True)
class Prepared:
    entry: Entry
    facts: TreeFacts
    kernel: Path
    initrd: Path | None
    rootfs: Path | None
    label: str | None


# ---------------------------------------------------------------- ext4


def tree_usage(tree: Path) -> tuple[int, int]:
    """(bytes in 4 KiB blocks, inode count) of TREE, without following links."""
    blocks = 0
    inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(tree):
        inodes += 1
        blocks += 1
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            try:
                info = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if info.st_nlink > 1:
                if (info.st_dev, info.st_ino) in seen:
                    continue
                seen.add((info.st_dev, info.st_ino))
            inodes += 1
            if stat.S_ISREG(info.st_mode) or (stat.S_ISLNK(info.st_mode) and info.st_size > 59):
                blocks += (info.st_size + 4095) // 4096
    return blocks * 4096, inodes


def ext4_size(used: int, inodes: int) -> int:
    """Image size: the data, inode tables, directory/extent overhead and slack."""
    size = int(used * 1.10) + inodes * 256 + 64 * 1024 * 1024
    return (size + 1024 * 1024 - 1) // (1024 * 1024) * (1024 * 1024)


def mkfs_argv(mkfs: str, tree: Path, out: Path, label: str, size: int, inodes: int) -> list[str]:
    return [
        mkfs,
        "-q", "-F",
        "-t", "ext4",
        "-L", label,
        "-d", os.fspath(tree),
        "-N", str(int(inodes * 1.2) + 1024),
        "-m", "0",
        # Read-only for its whole life: no journal, nothing reserved to grow.
        "-O", "^has_journal,^resize_inode",
        "-E", "root_owner=0:0",
        os.fspath(out),
        f"{size // 1024}k",
    ]  # fmt: skip


def build_ext4(tree: Path, out: Path, label: str) -> None:
    """Make OUT, an ext4 image of TREE, via a temporary name in the same dir."""
    mkfs = os.fspath(run.require("mkfs.ext4", "/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"))
    used, inodes = tree_usage(tree)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    size = ext4_size(used, inodes)
    for attempt in range(2):
        tmp.unlink(missing_ok=True)
        try:
            run.run(mkfs_argv(mkfs, tree, tmp, label, size, inodes))
            break
        except CommandError:
            tmp.unlink(missing_ok=True)
            if attempt:
                raise
            size = int(size * 1.5)
            logger.debug("mkfs.ext4 failed; retrying with %d bytes", size)
    os.chmod(tmp, 0o644)
    tmp.replace(out)


# ---------------------------------------------------------------- preparing


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o644)
    tmp.replace(dst)


@inns.entry
def prepare_tree(root: str, out: str, block_label: str, want_facts: str) -> None:
    """Read the mounted image at ROOT into the cache entry OUT (via ``inns.call``).

    Writes facts, kernel/initramfs when missing, and rootfs.ext4 labelled
    BLOCK_LABEL unless that is empty; WANT_FACTS is "1" or "".
    """
    _fill_entry(Path(root), Path(out), block_label or None, bool(want_facts))


def _fill_entry(root: Path, out: Path, block_label: str | None, want_facts: bool) -> None:
    facts = probe(root) if want_facts else None
    if facts is not None:
        if len(facts.kernels) == 1:
            _extract_kernel(root, facts.kernels[0], out)
            if facts.initramfs and not facts.initramfs.get("overlay"):
                _copy_overlay_module(root, facts.kernels[0].version, out)
        data = facts.to_json()
        data["bcvk_format"] = FORMAT
        paths.write_atomic(out / FACTS, json.dumps(data), 0o644)
    if block_label:
        build_ext4(root, out / ROOTFS, block_label)


def _copy_overlay_module(root: Path, kver: str, out: Path) -> None:
    """The image's overlayfs module, for an initramfs without it (initramfs-tools
    leaves it out): bcvk's archive carries it so the /etc overlay can mount."""
    directory = f"/usr/lib/modules/{kver}/kernel/fs/overlayfs"
    for found in tree.entries(root, directory, "overlay.ko*"):
        source = resolve(root, found)
        if source is not None and source.is_file():
            _copy(source, out / source.name)
            return


def overlay_module(entry: Entry) -> Path | None:
    found = sorted(entry.path.glob("overlay.ko*"))
    return found[0] if found else None


def _extract_kernel(root: Path, kernel: Kernel, out: Path) -> None:
    source = resolve(root, kernel.path)
    if source is None:
        raise BcvkError(
            f"kernel {kernel.path} vanished from the image",
            hint="the image changed while bcvk read it; run the command again",
        )
    if kernel.kind == "uki":
        tmp_k = out / f".{KERNEL}.tmp"
        tmp_i = out / f".{INITRD}.tmp"
        has_initrd = extract_uki(source, tmp_k, tmp_i)
        tmp_k.replace(out / KERNEL)
        if has_initrd:
            tmp_i.replace(out / INITRD)
        return
    _copy(source, out / KERNEL)
    if kernel.initramfs:
        initrd = resolve(root, kernel.initramfs)
        if initrd is not None:
            _copy(initrd, out / INITRD)


def with_bcvk_archive(entry: Entry) -> Path:
    """The image's initramfs with bcvk's archive appended (``bcvk.guest.initrd``).

    Named by the archive's digest, so a bcvk with other guest files makes
    (and a warm snapshot keyed on this file sees) a new one; older ones go.
    """
    module = overlay_module(entry)
    out = entry.path / f"initramfs-bcvk-{guest_initrd.digest()}{'-overlay' if module else ''}.img"
    if out.exists():
        return out
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with entry.initrd.open("rb") as src, tmp.open("wb") as dst:
        shutil.copyfileobj(src, dst)
        # Archives in an initramfs start on a 4-byte boundary.
        dst.write(b"\0" * (-dst.tell() % 4))
        dst.write(guest_initrd.archive())
        if module is not None:
            dst.write(guest_initrd.modules_archive({module.name: module.read_bytes()}))
    tmp.replace(out)
    for old in entry.path.glob("initramfs-bcvk-*.img"):
        if old != out:
            old.unlink(missing_ok=True)
    return out


def _run_prepare(mnt: Path, entry: Entry, block_label: str | None, want_facts: bool) -> None:
    inns.call(prepare_tree, mnt, entry.path, block_label or "", "1" if want_facts else "")


def prepare(image: str, image_id: str, *, block: bool, mount: Callable[[], Path]) -> Prepared:
    """The cached kernel, facts and (if BLOCK) rootfs image of IMAGE.

    MOUNT is called (only on a cache miss) for the image's mounted tree; the
    caller owns that mount and unmounts it.  Entries are filled under an
    exclusive lock, so concurrent starts of one image build it once.
    """
    entry = entry_for(image_id)
    cache_root().mkdir(parents=True, exist_ok=True)
    entry.path.mkdir(mode=0o755, exist_ok=True)
    with paths.locked(entry.lock):
        facts = entry.facts()
        need_facts = facts is None
        label = label_for(image_id) if block else None
        need_block = block and not entry.rootfs.exists()
        if need_facts or need_block:
            what = "Building the root filesystem image" if need_block else "Reading the image"
            start = time.monotonic()
            logger.info("%s %s (once per image)…", what, image)
            _run_prepare(mount(), entry, label if need_block else None, need_facts)
            logger.debug("prepared %s in %.1fs", image, time.monotonic() - start)
            facts = entry.facts()
            if facts is None:
                raise BcvkError(
                    f"could not read the facts of image {image}",
                    hint="`bcvk ephemeral cache prune` removes the cached copy",
                )
        boot_initrd = with_bcvk_archive(entry) if entry.initrd.exists() else None
        (entry.path / META).write_text(json.dumps({"image": image, "id": image_id}))
        entry.touch()
    assert facts is not None
    return Prepared(
        entry=entry,
        facts=facts,
        kernel=entry.kernel,
        initrd=boot_initrd,
        rootfs=entry.rootfs if block else None,
        label=label,
    )


# ---------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class Snapshot:
    """One saved machine: ``warm/KEY.state``, its ``KEY.json`` and ``KEY.lock``."""

    entry: Entry
    key: str

    @property
    def state(self) -> Path:
        return self.entry.warm / f"{self.key}.state"

    @property
    def meta(self) -> Path:
        return self.entry.warm / f"{self.key}.json"

    @property
    def lock(self) -> Path:
        return self.entry.warm / f"{self.key}.lock"

    def read_meta(self) -> dict[str, object] | None:
        try:
            data = json.loads(self.meta.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def usable(self) -> bool:
        """Complete as written: its metadata names this key and the file's size."""
        meta = self.read_meta()
        try:
            size = self.state.stat().st_size
        except OSError:
            return False
        return meta is not None and meta.get("key") == self.key and meta.get("size") == size

    def remove(self) -> None:
        for path in (self.state, self.meta):
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class SnapshotInfo:
    key: str
    size: int
    created: float
    last_used: float

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "size": self.size,
            "created": int(self.created),
            "last_used": int(self.last_used),
        }


def snapshots(entry: Entry) -> list[SnapshotInfo]:
    found = []
    for path in sorted(_children(entry.warm)):
        if path.suffix != ".state" or path.name.startswith("."):
            continue
        snap = Snapshot(entry, path.stem)
        meta = snap.read_meta() or {}
        created = meta.get("created")
        with contextlib.suppress(OSError):
            found.append(
                SnapshotInfo(
                    key=snap.key,
                    size=path.stat().st_blocks * 512,
                    created=float(created) if isinstance(created, int | float) else 0.0,
                    last_used=snap.meta.stat().st_mtime if snap.meta.exists() else 0.0,
                )
            )
    return found


def prune_snapshots(entry: Entry, *, older_than: float | None, dry_run: bool) -> list[SnapshotInfo]:
    """Remove ENTRY's snapshots last used before OLDER_THAN (a time), or all if None."""
    removed = []
    for info in snapshots(entry):
        if older_than is not None and info.last_used >= older_than:
            continue
        snap = Snapshot(entry, info.key)
        if not dry_run:
            with paths.locked(snap.lock, blocking=False, remove=True) as free:
                if not free:  # being saved right now
                    continue
                snap.remove()
        removed.append(info)
    if not dry_run:
        _remove_abandoned_saves(entry)
    return removed


def _remove_abandoned_saves(entry: Entry) -> None:
    """Temporary files of savers that were killed (``.KEY.PID.tmp``), whose lock is free."""
    for tmp in _children(entry.warm):
        parts = tmp.name.split(".")
        if len(parts) != 4 or parts[0] or parts[3] != "tmp":
            continue
        with paths.locked(Snapshot(entry, parts[1]).lock, blocking=False, remove=True) as free:
            if free:
                tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- cache listing


@dataclass(frozen=True)
class CacheInfo:
    image_id: str
    image: str
    size: int
    last_used: float
    has_rootfs: bool
    image_present: bool
    in_use: bool
    snapshots: tuple[SnapshotInfo, ...] = ()
    # From prune: only these snapshots of the entry went, the entry stays.
    only_snapshots: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "image_id": self.image_id,
            "image": self.image,
            "size": self.size,
            "last_used": int(self.last_used),
            "rootfs": self.has_rootfs,
            "image_present": self.image_present,
            "in_use": self.in_use,
            "snapshots": [s.to_json() for s in self.snapshots],
        }


def entries() -> list[Entry]:
    base = cache_root()
    if not base.is_dir():
        return []
    return [Entry(p) for p in sorted(base.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def open_files() -> set[str]:
    """Paths our processes hold open (QEMU keeps rootfs.ext4 open while it runs)."""
    found: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    found.add(os.readlink(fd))
        except OSError:
            continue
    return found


def _present_ids() -> set[str]:
    try:
        return {str(e.get("Id", "")) for e in podman.list_images(label=None)}
    except BcvkError:
        return set()


def describe() -> list[CacheInfo]:
    live_ids = {rec.image_id.removeprefix("sha256:") for _, rec in state.scan()}
    held = open_files()
    present = _present_ids()
    infos = []
    for entry in entries():
        in_use = entry.image_id in live_ids or any(
            f.startswith(os.fspath(entry.path) + "/") for f in held
        )
        with paths.locked(entry.lock, blocking=False) as free:
            in_use = in_use or not free
        meta = entry.meta()
        infos.append(
            CacheInfo(
                image_id=entry.image_id,
                image=str(meta.get("image", "")),
                size=entry.size(),
                last_used=entry.last_used(),
                has_rootfs=entry.rootfs.exists(),
                image_present=entry.image_id in present,
                in_use=in_use,
                snapshots=tuple(snapshots(entry)),
            )
        )
    return infos


def prune(*, older_than_days: float | None, everything: bool, dry_run: bool) -> list[CacheInfo]:
    """Remove entries whose image is gone or unused for long; never one in use.

    Of the entries kept, snapshots unused for as long go too (with EVERYTHING,
    all snapshots not being saved): a snapshot of an old configuration is
    never restored again.
    """
    removed = []
    now = time.time()
    cutoff = None if everything or older_than_days is None else now - older_than_days * 86400
    for info in describe():
        old = older_than_days is not None and now - info.last_used > older_than_days * 86400
        if info.in_use or not (everything or old or not info.image_present):
            if cutoff is not None or everything:
                gone = prune_snapshots(entry_for(info.image_id), older_than=cutoff, dry_run=dry_run)
                if gone:
                    removed.append(
                        dataclasses.replace(
                            info,
                            size=sum(g.size for g in gone),
                            snapshots=tuple(gone),
                            only_snapshots=True,
                        )
                    )
            continue
        entry = entry_for(info.image_id)
        if not dry_run:
            with paths.locked(entry.lock, blocking=False) as free:
                if not free:
                    continue
                shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(info)
    return removed
