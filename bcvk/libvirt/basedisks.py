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
import dataclasses
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

from bcvk import paths, to_disk
from bcvk.errors import BcvkError
from bcvk.host import secureboot
from bcvk.libvirt.connection import Connection, Pool, Volume, VolumeInfo
from bcvk.log import logger, step

PREFIX = "bootc-base-"
SUFFIX = ".qcow2"


@dataclass(frozen=True)
class InstallOptions:
    """The to-disk choices that shape a base disk (all part of its cache key)."""

    disk_size: int
    filesystem: to_disk.Filesystem | None = None
    root_size: int | None = None
    kargs: tuple[str, ...] = ()
    secure_boot_keys: secureboot.Keys | None = None  # sign its boot chain

    def to_disk_options(self) -> to_disk.Options:
        return to_disk.Options(
            format=to_disk.DiskFormat.qcow2,
            filesystem=self.filesystem,
            disk_size=self.disk_size,
            root_size=self.root_size,
            kargs=self.kargs,
            secure_boot_keys=self.secure_boot_keys,
            # any VM of the disk can then stream its journal (run --log-dir)
            guest_services=True,
        )


def disk_request(image: str, output: Path, opts: InstallOptions) -> to_disk.Request:
    """The to-disk build of IMAGE's base disk at OUTPUT; its cache hash names the volume."""
    return to_disk.request(image, output, opts.to_disk_options())


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
        raise BcvkError(
            f"{path} is not a qcow2 image",
            hint="remove it (`bcvk libvirt base-disks prune`) and let bcvk rebuild it",
        )
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
def scratch_dir() -> Iterator[Path]:
    # /var/tmp: large, persistent-class storage that keeps user xattrs.
    base = Path("/var/tmp") if os.access("/var/tmp", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="bcvk-upload-", dir=base) as tmp:
        yield Path(tmp)


def upload_file(pool: Pool, source: Path, name: str, fmt: str) -> Volume:
    """Create volume NAME in POOL and stream SOURCE's bytes into it."""
    capacity = qcow2_virtual_size(source) if fmt == "qcow2" else source.stat().st_size
    volume = pool.create_volume(volume_xml(name, capacity, fmt), name)
    try:
        size = source.stat().st_size
        with step(f"Uploading {source.name} ({size // (1024 * 1024)} MiB) to pool {pool.name}"):
            volume.upload(source)
    except BaseException:
        volume.delete()
        raise
    pool.refresh()
    return volume


def ensure(conn: Connection, pool: Pool, image: str, opts: InstallOptions) -> BaseDisk:
    """The base disk for IMAGE+OPTS in POOL, built or rebuilt when missing or stale."""
    directory = pool_writable(conn, pool)
    if directory is not None:
        # The cache hash names the volume and does not depend on the path.
        staged = disk_request(image, directory / "bootc-base.qcow2", opts)
        output = directory / volume_name(staged.cache_hash)
        with build_lock(conn, pool, output.name):
            pool.refresh()  # see files removed (or added) behind libvirt's back
            return _ensure_in_place(conn, pool, dataclasses.replace(staged, output=output))
    with scratch_dir() as tmp:
        req = disk_request(image, tmp / "bootc-base.qcow2", opts)
        name = volume_name(req.cache_hash)
        with build_lock(conn, pool, name):
            return _ensure_uploaded(pool, req, name)


def _ensure_uploaded(pool: Pool, req: to_disk.Request, name: str) -> BaseDisk:
    """Where bcvk cannot write into the pool: build here, stream it in once."""
    pool.refresh()
    volume = pool.volume(name)
    if volume is not None:
        logger.info("Reusing base disk %s in pool %s", name, pool.name)
        vinfo = volume.info()
        return BaseDisk(name, vinfo.path, vinfo.capacity, req.cache_hash, True)
    with step(f"Building base disk {name} locally"):
        to_disk.run(req)
    volume = upload_file(pool, req.output, name, "qcow2")
    vinfo = volume.info()
    return BaseDisk(name, vinfo.path, vinfo.capacity, req.cache_hash, False)


def _ensure_in_place(conn: Connection, pool: Pool, req: to_disk.Request) -> BaseDisk:
    """Where bcvk can write into the pool, to-disk reuses or builds the file in place."""
    output = req.output
    name = output.name
    volume = pool.volume(name)
    if output.exists():
        if volume is not None and to_disk.read_cache_hash(output) == req.cache_hash:
            logger.info("Reusing base disk %s", name)
            return BaseDisk(name, volume.path, volume.info().capacity, req.cache_hash, True)
        users = references([v.info() for v in pool.volumes()], domain_disk_paths(conn))
        if users.get(os.fspath(output)):
            # Rebuilding in place would swap the backing file under those VMs.
            raise BcvkError(
                f"base disk {name} does not carry the expected cache hash, and VM disks "
                f"use it ({', '.join(users[os.fspath(output)])})",
                hint="remove those VMs, or restore the file; bcvk will not overwrite it",
            )
    with step(f"Preparing base disk {name}"):
        result = to_disk.run(req)
    pool.refresh()
    volume = pool.volume(name)
    if volume is None:
        raise BcvkError(
            f"pool {pool.name} does not show the base disk {output}",
            hint=f"check the pool's directory: `virsh pool-dumpxml {pool.name}`",
        )
    return BaseDisk(name, volume.path, volume.info().capacity, result.cache_hash, result.reused)


@contextlib.contextmanager
def build_lock(conn: Connection, pool: Pool, name: str) -> Iterator[None]:
    """Held while a base disk is checked, built and put in place, and while one is pruned.

    Two runs of one image on a cold cache build it once: the second waits and
    reuses the first's, instead of renaming its own over a disk a VM may
    already be backed by.
    """
    with paths.one_at_a_time(
        f"base-disk\0{conn.uri}\0{pool.name}\0{name}",
        f"Waiting for another bcvk that is preparing base disk {name}…",
    ):
        yield


def volume_xml(name: str, capacity: int, fmt: str, backing_path: str | None = None) -> str:
    """A storage volume (qcow2 overlays name their BACKING_PATH), built with escaping."""
    vol = ET.Element("volume", {"type": "file"})
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", {"unit": "bytes"}).text = str(capacity)
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", {"type": fmt})
    if backing_path is not None:
        # Only the owner reads a VM's disk (it holds the guest's /etc/shadow).
        ET.SubElement(ET.SubElement(target, "permissions"), "mode").text = "0600"
        backing = ET.SubElement(vol, "backingStore")
        ET.SubElement(backing, "path").text = backing_path
        ET.SubElement(backing, "format", {"type": "qcow2"})
    return ET.tostring(vol, encoding="unicode")


def overlay_xml(name: str, capacity: int, backing_path: str) -> str:
    """A qcow2 volume backed by BACKING_PATH (libvirt runs qemu-img for us)."""
    return volume_xml(name, capacity, "qcow2", backing_path)


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
                image_digest=to_disk.read_image_digest(info.path) if local else None,
                cache_hash=to_disk.read_cache_hash(info.path) if local else None,
            )
        )
    return rows


def prune(conn: Connection, pool: Pool, dry_run: bool = False) -> list[BaseDiskInfo]:
    """Delete base disks nothing references; returns those deleted (or that would be)."""
    unused = [b for b in list_base_disks(conn, pool) if not b.references]
    if dry_run:
        return unused
    deleted = [b for b in unused if delete_if_unused(conn, pool, b.name)]
    if deleted:
        pool.refresh()
    return deleted


def delete_if_unused(conn: Connection, pool: Pool, name: str) -> bool:
    """Delete base disk NAME unless a VM disk uses it, decided under its build lock."""
    with build_lock(conn, pool, name):
        pool.refresh()
        infos = [v.info() for v in pool.volumes()]
        path = next((i.path for i in infos if i.name == name), None)
        if path is None or references(infos, domain_disk_paths(conn)).get(path):
            return False
        volume = pool.volume(name)
        if volume is None:
            return False
        logger.info("Deleting unreferenced base disk %s", name)
        volume.delete()
        return True
