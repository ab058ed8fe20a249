"""Base disks: ``to-disk`` output kept in a libvirt pool, cloned per VM.

A base disk is ``bootc-base-<first 16 hex of the to-disk cache hash>.qcow2``
in the pool, keyed exactly like the to-disk cache (``to_disk.cache_key``), so
a second VM of the same image and install options is a qcow2 overlay made in
a fraction of a second.  Where bcvk can write into the pool directory it lets
``to_disk.build`` create (or validate and reuse) the file in place; otherwise
(remote URIs, a non-root user on qemu:///system) it builds into a local temp
directory and streams the file into the pool through the libvirt API.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bcvk.errors import BcvkError
from bcvk.host import podman
from bcvk.libvirt.connection import Connection, Pool, Volume, VolumeInfo
from bcvk.log import logger, step

if TYPE_CHECKING:
    from bcvk import to_disk

PREFIX = "bootc-base-"
XATTR_HASH = "user.bootc.cache_hash"  # what to-disk records (to_disk.XATTR_HASH)
SUFFIX = ".qcow2"


@dataclass(frozen=True)
class InstallOptions:
    """The to-disk choices that shape a base disk (all part of its cache key)."""

    disk_size: int
    filesystem: str | None = None
    root_size: int | None = None
    kargs: tuple[str, ...] = ()

    def to_disk_options(self) -> to_disk.Options:
        # Imported on use: listing VMs should not load the disk builder.
        from bcvk import to_disk
        from bcvk.to_disk.layout import Filesystem

        return to_disk.Options(
            format=to_disk.DiskFormat.qcow2,
            filesystem=Filesystem(self.filesystem) if self.filesystem else None,
            disk_size=self.disk_size,
            root_size=self.root_size,
            kargs=self.kargs,
        )


def expected_hash(image: str, info: podman.ImageInfo, opts: InstallOptions) -> str:
    """The to-disk cache hash a qcow2 of IMAGE built with OPTS carries."""
    from bcvk import to_disk

    tdo = opts.to_disk_options()
    ref = to_disk.normalize_reference(image)
    digest = info.digest or info.id
    key = to_disk.cache_key(ref, digest, to_disk.DiskFormat.qcow2, opts.disk_size, tdo)
    return to_disk.cache_hash(key)


def volume_name(cache_hash: str) -> str:
    hexdigits = cache_hash.split(":", 1)[-1]
    return f"{PREFIX}{hexdigits[:16]}{SUFFIX}"


def is_base_name(name: str) -> bool:
    return name.startswith(PREFIX) and name.endswith(SUFFIX)


def qcow2_virtual_size(path: Path) -> int:
    """The virtual size in a qcow2 header (big-endian u64 at offset 24)."""
    with path.open("rb") as fh:
        header = fh.read(32)
    if len(header) < 32 or header[:4] != b"QFI\xfb":
        raise BcvkError(f"{path} is not a qcow2 image")
    (size,) = struct.unpack(">Q", header[24:32])
    return int(size)


def pool_writable(conn: Connection, pool: Pool) -> Path | None:
    """The pool directory when this process can write into it directly."""
    if conn.info.remote:
        return None
    path = pool.path()
    if path.is_dir() and os.access(path, os.W_OK | os.X_OK):
        return path
    return None


@dataclass(frozen=True)
class BaseDisk:
    volume: str
    path: str
    capacity: int
    cache_hash: str
    reused: bool


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    # /var/tmp: large, persistent-class storage that keeps user xattrs.
    base = Path("/var/tmp") if os.access("/var/tmp", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="bcvk-upload-", dir=base) as tmp:
        yield Path(tmp)


def build_local(image: str, output: Path, opts: InstallOptions) -> str:
    """Build (or reuse) a qcow2 of IMAGE at OUTPUT with to-disk; returns its cache hash."""
    from bcvk import to_disk

    result = to_disk.build(
        image,
        output,
        format="qcow2",
        filesystem=opts.filesystem,
        disk_size=opts.disk_size,
        root_size=opts.root_size,
        kargs=opts.kargs,
    )
    return result.cache_hash


def upload_file(pool: Pool, source: Path, name: str, fmt: str) -> Volume:
    """Create volume NAME in POOL and stream SOURCE's bytes into it."""
    capacity = qcow2_virtual_size(source) if fmt == "qcow2" else source.stat().st_size
    xml = (
        f"<volume type='file'><name>{name}</name>"
        f"<capacity unit='bytes'>{capacity}</capacity>"
        f"<target><format type='{fmt}'/></target></volume>"
    )
    volume = pool.create_volume(xml, name)
    try:
        size = source.stat().st_size
        with step(f"Uploading {source.name} ({size // (1024 * 1024)} MiB) to pool {pool.name}"):
            volume.upload(source)
    except BaseException:
        volume.delete()
        raise
    pool.refresh()
    return volume


def ensure(
    conn: Connection, pool: Pool, image: str, info: podman.ImageInfo, opts: InstallOptions
) -> BaseDisk:
    """The base disk for IMAGE+OPTS in POOL, built or rebuilt when missing or stale."""
    expected = expected_hash(image, info, opts)
    name = volume_name(expected)
    directory = pool_writable(conn, pool)
    pool.refresh()  # see files removed (or added) behind libvirt's back
    if directory is not None:
        output = directory / name
        existed = output.exists()
        volume = pool.volume(name)
        if existed and volume is not None:
            if _xattr(os.fspath(output), XATTR_HASH) == expected:
                logger.info("Reusing base disk %s", name)
                return BaseDisk(name, volume.path, volume.info().capacity, expected, True)
            users = references([v.info() for v in pool.volumes()], domain_disk_paths(conn))
            if users.get(os.fspath(output)):
                # Rebuilding in place would swap the backing file under those VMs.
                raise BcvkError(
                    f"base disk {name} does not carry the expected cache hash, and VM disks "
                    f"use it ({', '.join(users[os.fspath(output)])})",
                    hint="remove those VMs, or restore the file; bcvk will not overwrite it",
                )
        with step(f"Preparing base disk {name}"):
            got = build_local(image, output, opts)
        if got != expected:
            if not existed:
                output.unlink(missing_ok=True)
            raise BcvkError(
                f"image {image} changed while its base disk was being built",
                hint="retry once the image is no longer being rebuilt",
            )
        pool.refresh()
        volume = pool.volume(name)
        if volume is None:
            raise BcvkError(f"pool {pool.name} does not show the base disk {output}")
        capacity = volume.info().capacity
        reused = existed and output.exists()
        return BaseDisk(name, volume.path, capacity, expected, reused)
    volume = pool.volume(name)
    if volume is not None:
        logger.info("Reusing base disk %s in pool %s", name, pool.name)
        vinfo = volume.info()
        return BaseDisk(name, vinfo.path, vinfo.capacity, expected, True)
    with _scratch_dir() as tmp:
        output = tmp / name
        with step(f"Building base disk {name} locally"):
            got = build_local(image, output, opts)
        if got != expected:
            raise BcvkError(
                f"image {image} changed while its base disk was being built",
                hint="retry once the image is no longer being rebuilt",
            )
        volume = upload_file(pool, output, name, "qcow2")
    vinfo = volume.info()
    return BaseDisk(name, vinfo.path, vinfo.capacity, expected, False)


def overlay_xml(name: str, capacity: int, backing_path: str) -> str:
    """A qcow2 volume backed by BACKING_PATH (libvirt runs qemu-img for us)."""
    return (
        f"<volume type='file'><name>{name}</name>"
        f"<capacity unit='bytes'>{capacity}</capacity>"
        "<target><format type='qcow2'/><permissions><mode>0600</mode></permissions></target>"
        f"<backingStore><path>{backing_path}</path><format type='qcow2'/></backingStore>"
        "</volume>"
    )


# ------------------------------------------------------------------ listing


@dataclass(frozen=True)
class BaseDiskInfo:
    name: str
    path: str
    allocation: int
    capacity: int
    mtime: float | None
    references: tuple[str, ...]  # volumes (or domains) that use it
    image_digest: str | None
    cache_hash: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "path": self.path,
            "size": self.allocation,
            "virtual_size": self.capacity,
            "created": self.mtime,
            "references": len(self.references),
            "referenced_by": list(self.references),
            "image_digest": self.image_digest,
            "cache_hash": self.cache_hash,
        }


def _xattr(path: str, name: str) -> str | None:
    try:
        return os.getxattr(path, name).decode(errors="replace")
    except OSError:
        return None


def references(infos: list[VolumeInfo], domain_disks: dict[str, list[str]]) -> dict[str, list[str]]:
    """Map each base disk path to the volumes and domains that use it (pure)."""
    refs: dict[str, list[str]] = {i.path: [] for i in infos if is_base_name(i.name)}
    for info in infos:
        if info.backing_path and info.backing_path in refs and info.path != info.backing_path:
            refs[info.backing_path].append(info.name)
    for domain, disks in domain_disks.items():
        for disk in disks:
            if disk in refs:
                refs[disk].append(f"domain:{domain}")
    return refs


def domain_disk_paths(conn: Connection) -> dict[str, list[str]]:
    """Disk source paths of every domain (a transient VM uses a base disk directly)."""
    from bcvk.libvirt.connection import DomainNotFound
    from bcvk.libvirt.xml import Domain

    found: dict[str, list[str]] = {}
    for dom in conn.domains():
        try:
            parsed = Domain.from_xml(dom.xml())
        except DomainNotFound:
            continue
        found[dom.name] = [d.source for d in parsed.disks]
    return found


def list_base_disks(conn: Connection, pool: Pool) -> list[BaseDiskInfo]:
    pool.refresh()
    infos = [v.info() for v in pool.volumes()]
    refs = references(infos, domain_disk_paths(conn))
    local = not conn.info.remote
    rows: list[BaseDiskInfo] = []
    for info in sorted(infos, key=lambda i: i.name):
        if not is_base_name(info.name):
            continue
        rows.append(
            BaseDiskInfo(
                name=info.name,
                path=info.path,
                allocation=info.allocation,
                capacity=info.capacity,
                mtime=info.mtime,
                references=tuple(refs.get(info.path, [])),
                image_digest=_xattr(info.path, "user.bootc.image_digest") if local else None,
                cache_hash=_xattr(info.path, XATTR_HASH) if local else None,
            )
        )
    return rows


def prune(conn: Connection, pool: Pool, dry_run: bool = False) -> list[BaseDiskInfo]:
    """Delete base disks nothing references; returns those deleted (or that would be)."""
    unused = [b for b in list_base_disks(conn, pool) if not b.references]
    for base in unused:
        if dry_run:
            continue
        volume = pool.volume(base.name)
        if volume is not None:
            logger.info("Deleting unreferenced base disk %s", base.name)
            volume.delete()
    if unused and not dry_run:
        pool.refresh()
    return unused
