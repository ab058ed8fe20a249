"""`bcvk to-disk`: a bootable disk image from a bootc container image.

Two installers build the disk from one ``Request``: the native one
(``bcvk.to_disk.native``: no VM, no loop device, no mount, no root) and the
image's own ``bootc install to-disk`` in a VM (``bcvk.to_disk.bootc``).
``run`` resolves the request, reuses a cached OUTPUT, and dispatches; neither
installer knows the other.  Everything is built in a hidden work directory
beside OUTPUT and renamed into place at the very end, so an interrupted or
failed run never leaves a partial OUTPUT.

Python API::

    from bcvk import to_disk
    result = to_disk.build("localhost/my-image:latest", "out.qcow2", kargs=["console=ttyS0"])
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from bcvk.errors import BcvkError, CommandError, UsageError
from bcvk.host import podman
from bcvk.log import logger
from bcvk.to_disk import runs
from bcvk.to_disk.assemble import OVA_NAME_MAX
from bcvk.to_disk.layout import Filesystem, PartitionTable, default_disk_size
from bcvk.to_disk.options import (
    Action,
    DiskFormat,
    Installer,
    Options,
    Request,
    Result,
    cache_hash,
    cache_key,
    check_disk_size,
    check_firmware,
    check_native_options,
    check_picked_firmware,
    format_from_path,
    make_options,
    validate,
)
from bcvk.to_disk.output import (
    XATTR_DIGEST,
    XATTR_HASH,
    exclusive,
    existing_hash,
    no_space,
    read_xattr,
    work_directory,
    xattrs_supported,
)

__all__ = [
    "Action",
    "DiskFormat",
    "Filesystem",
    "Installer",
    "Options",
    "PartitionTable",
    "Request",
    "Result",
    "build",
    "check_disk_size",
    "check_firmware",
    "check_picked_firmware",
    "make_options",
    "normalize_reference",
    "read_cache_hash",
    "reap_interrupted",
    "read_image_digest",
    "request",
    "run",
]


def reap_interrupted() -> list[str]:
    """Undo what killed to-disk runs of this host left (work dirs, image mounts)."""
    return runs.reap()


def read_cache_hash(path: Path | str) -> str | None:
    """The cache hash a disk bcvk built carries (None for any other file)."""
    return read_xattr(path, XATTR_HASH)


def read_image_digest(path: Path | str) -> str | None:
    return read_xattr(path, XATTR_DIGEST)


def normalize_reference(image: str) -> str:
    for prefix in ("containers-storage:", "docker://"):
        if image.startswith(prefix):
            image = image[len(prefix) :]
    return podman.validate_reference(image)


def build(image: str, output: str | os.PathLike[str], **options: Any) -> Result:
    """Build (or reuse) a bootable disk at OUTPUT from IMAGE; see ``bcvk to-disk --help``.

    OPTIONS are ``make_options``'s, in their CLI spellings (``filesystem="xfs"``).
    """
    return run(request(image, output, make_options(**options)))


def request(image: str, output: str | os.PathLike[str], opts: Options) -> Request:
    """Resolve OPTS against IMAGE and OUTPUT: everything checked before any work."""
    from bcvk.to_disk.output import check_output_path

    start = time.monotonic()
    ref = normalize_reference(image)
    path = Path(os.path.abspath(output))
    fmt = opts.format or format_from_path(path)
    validate(opts, fmt)
    check_output_path(path)
    if fmt is DiskFormat.ova and len(path.stem.encode()) > OVA_NAME_MAX:
        raise UsageError(
            f"OUTPUT name {path.name!r} is too long for an OVA",
            hint=f"an OVA's file names are at most {OVA_NAME_MAX} bytes before -disk1.vmdk",
        )
    info = podman.local_image(ref, bootc=True)
    digest = info.digest or info.id
    disk_size = opts.disk_size or default_disk_size(info.size)
    key = cache_key(ref, digest, fmt, disk_size, opts)
    hashed = cache_hash(key)
    logger.debug("cache key %s = %s", json.dumps(key, sort_keys=True), hashed)
    return Request(ref, info.id, digest, info.size, path, opts, fmt, disk_size, hashed, start)


def run(req: Request) -> Result:
    """Reuse OUTPUT when it carries the request's cache hash, else build it."""
    reap_interrupted()
    with exclusive(req.output):
        return _run(req)


def _run(req: Request) -> Result:
    opts = req.opts
    found = existing_hash(req.output, force=opts.force)
    if found == req.cache_hash:
        # --force permits replacing a foreign file; an exact cache hit is
        # still reused (delete OUTPUT to force a rebuild).
        if not opts.dry_run:
            logger.info("Reusing existing cached disk image at: %s", req.output)
        action = Action.would_reuse if opts.dry_run else Action.reused
        seconds = time.monotonic() - req.start
        size = req.output.stat().st_size
        return Result(req.output, action, req.cache_hash, req.digest, req.fmt, size=size,
                      seconds=seconds)  # fmt: skip
    if opts.dry_run:
        return Result(req.output, Action.would_regenerate, req.cache_hash, req.digest, req.fmt)
    warnings: list[str] = []
    if (why := xattrs_supported(req.output.parent)) is not None:
        warnings.append(
            f"the filesystem holding {req.output.parent} does not support user extended "
            f"attributes ({why}): bcvk cannot record the cache key, so every run rebuilds "
            "the disk and replacing it needs --force; write to ext4, xfs, btrfs or tmpfs "
            "(/var/tmp, your home) to get caching"
        )
        logger.warning("%s", warnings[-1])
    try:
        result = _install(req)
    except (OSError, CommandError) as exc:
        if no_space(exc):
            raise BcvkError(
                f"no space left on the filesystem holding {req.output.parent} while building "
                "the disk; nothing was written to OUTPUT",
                hint="free some space or choose an OUTPUT on a bigger filesystem "
                f"(raw disks are sparse; a {req.fmt.value} needs about twice the image size "
                "while it is built)",
            ) from exc
        raise
    return dataclasses.replace(result, warnings=(*warnings, *result.warnings))


def _install(req: Request) -> Result:
    """Pick the installer: --installer, else bootc when the image carries it."""
    # Imported here: the installers pull in the image reader and the whole
    # ephemeral pipeline, which `libvirt list`, `pb list` and every other
    # command that only names a Filesystem or Request should not pay for.
    from bcvk.to_disk import bootc, native

    opts = req.opts
    with work_directory(req.output) as build, build.mounted(req.image_id) as mount:
        work = build.directory
        tree = native.read(mount.path, req.image)
        use_bootc = opts.installer is Installer.bootc or (
            opts.installer is Installer.auto and tree.facts.has_bootc
        )
        check_picked_firmware(opts.firmware, opts.installer, tree.facts.has_bootc, req.image)
        if not use_bootc:
            check_native_options(opts)
            disk, size = native.build(req, mount, work, tree)
            seconds = time.monotonic() - req.start
            logger.info(
                "Wrote %s (%s, %s, %.1fs)", req.output, req.fmt.value, disk.filesystem.value,
                seconds,
            )  # fmt: skip
            return Result(req.output, Action.created, req.cache_hash, req.digest, req.fmt,
                          disk.filesystem, size, seconds, tuple(disk.warnings))  # fmt: skip
    if not tree.facts.has_bootc:
        raise BcvkError(
            f"--installer bootc: image {req.image} has no /usr/bin/bootc",
            hint="use --installer native (no VM, no root), or an image built FROM a bootc base",
        )
    if opts.installer is Installer.auto:
        logger.info("The image contains bootc: installing with its own `bootc install to-disk`")
    return bootc.build(req)
