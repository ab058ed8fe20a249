"""OUTPUT: whose it is, where a build works, and how a finished disk takes its place.

A build works in a hidden directory beside OUTPUT (same filesystem, so the
final rename is atomic), marks the finished disk as bcvk's with extended
attributes (the cache key, the image digest, bcvk's version) and renames it
over OUTPUT.  A file bcvk did not make is never replaced without --force.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bcvk import __version__, paths
from bcvk.errors import BcvkError, CommandError, NotFoundError, UsageError, os_hint
from bcvk.log import logger
from bcvk.to_disk import mkfs, runs

XATTR_HASH = "user.bootc.cache_hash"
XATTR_DIGEST = "user.bootc.image_digest"
XATTR_CREATOR = "user.bcvk.created_by"


def read_xattr(path: Path | str, name: str) -> str | None:
    try:
        return os.getxattr(path, name).decode(errors="replace")
    except OSError:
        return None


def created_by_bcvk(path: Path) -> bool:
    return read_xattr(path, XATTR_HASH) is not None or read_xattr(path, XATTR_CREATOR) is not None


def xattrs_supported(directory: Path) -> str | None:
    """None when DIRECTORY's filesystem takes user xattrs, else why not."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".bcvk-xattr-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        os.setxattr(fd, "user.bcvk.probe", b"1")
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
        os.unlink(probe)
    return None


def check_output_path(output: Path) -> None:
    """Refuse, before any work, an OUTPUT that could not be written at the end."""
    parent = output.parent
    # The work directory beside OUTPUT carries its name plus a suffix: check
    # that it fits before building, not when renaming at the end.
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except OSError:
        name_max = 255
    if len(os.fsencode(_work_name(output.name, "0" * 8))) > name_max:
        raise UsageError(
            f"OUTPUT file name is too long ({len(os.fsencode(output.name))} bytes)",
            hint=f"use a name of at most {name_max - len(_work_name('', '0' * 8))} bytes",
        )
    try:
        if not parent.is_dir():
            raise NotFoundError(
                f"output directory {parent} does not exist",
                hint=f"create it first (mkdir -p {parent}) or choose another OUTPUT",
            )
        if output.is_dir():
            raise UsageError(
                f"OUTPUT {output} is a directory", hint="give a file name, e.g. out.qcow2"
            )
    except OSError as exc:  # Python 3.11's is_dir() raises ENAMETOOLONG, EACCES
        raise UsageError(f"cannot use OUTPUT {output}: {exc.strerror}", hint=os_hint(exc)) from None
    # Creating a file is the only real test: access(2) says yes to root in
    # /proc, and to anyone on a read-only mount.
    try:
        fd, probe = tempfile.mkstemp(prefix=".bcvk-probe-", dir=parent)
    except OSError as exc:
        raise BcvkError(
            f"cannot create files in the output directory {parent}: {exc.strerror}",
            hint="choose a directory on a regular filesystem that you can write to",
        ) from None
    os.close(fd)
    os.unlink(probe)


def _work_name(name: str, token: str) -> str:
    return f".{name}.bcvk-{token}"


def existing_hash(output: Path, *, force: bool) -> str | None:
    """The cache hash an existing OUTPUT carries; refuses a file bcvk did not make.

    None when OUTPUT does not exist (or carries no hash but --force allows
    replacing it).
    """
    if not os.path.lexists(output):
        return None
    if not output.is_file() or output.is_symlink():
        raise BcvkError(
            f"OUTPUT {output} exists and is not a regular file",
            hint="remove it or choose another OUTPUT",
        )
    if not created_by_bcvk(output) and not force:
        raise BcvkError(
            f"refusing to overwrite {output}: bcvk did not create it",
            hint="pass --force to replace it, or choose another OUTPUT",
        )
    return read_xattr(output, XATTR_HASH)


def sweep_stale_work(output: Path) -> list[Path]:
    """Remove work directories beside OUTPUT that a killed run on this host left.

    ``runs.reap`` finds them through their records; this catches the ones
    whose record a reboot took with the runtime directory.  Anything without
    an owner file, from another host, or whose process still exists is left
    alone.
    """
    removed = []
    for work in output.parent.glob(f".{glob.escape(output.name)}.bcvk-*"):
        owner = runs.Owner.read(work)
        if owner is not None and owner.abandoned():
            logger.info("Removing %s, left by an interrupted run", work)
            mkfs.remove_tree(work)
            removed.append(work)
    return removed


@contextlib.contextmanager
def work_directory(output: Path) -> Iterator[runs.Run]:
    """A recorded build working in a hidden directory beside OUTPUT (``Run.work``).

    Beside OUTPUT: the same filesystem, so the final rename is atomic.
    """
    sweep_stale_work(output)
    with runs.recorded(output.parent / _work_name(output.name, secrets.token_hex(4))) as run:
        yield run


def finish(dest: Path, output: Path, cache: str, digest: str, *, force: bool = False) -> int:
    """Mark DEST as bcvk's (cache key xattrs) and put it at OUTPUT atomically.

    What is at OUTPUT is checked again at the rename itself, not only when
    the build began: a file that appeared there meanwhile, or that someone
    put in place of bcvk's, is kept (unless FORCE) and the new disk is not.
    """
    for name, value in ((XATTR_HASH, cache), (XATTR_DIGEST, digest), (XATTR_CREATOR, __version__)):
        with contextlib.suppress(OSError):
            os.setxattr(dest, name, value.encode())
    size = dest.stat().st_size
    try:
        paths.rename_noreplace(dest, output)
        return size
    except FileExistsError:
        pass
    # OUTPUT exists: swap, then look at what was swapped out.
    if paths.exchange(dest, output):
        if force or created_by_bcvk(dest):
            dest.unlink()
            return size
        paths.exchange(dest, output)  # put the foreign file back
    elif force or created_by_bcvk(output):
        os.replace(dest, output)
        return size
    raise BcvkError(
        f"{output} was created by someone else while the disk was built: it was kept, "
        "and the new disk was not written",
        hint="remove it or choose another OUTPUT, or pass --force to replace it",
    )


@contextlib.contextmanager
def exclusive(output: Path) -> Iterator[None]:
    """One bcvk at a time builds OUTPUT; a second waits, then finds the first's disk."""
    with paths.one_at_a_time(
        f"to-disk\0{output}", f"Waiting for another bcvk that is writing {output}…"
    ):
        yield


def no_space(exc: BaseException) -> bool:
    """Whether EXC says the filesystem (or a quota) ran out of space."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, CommandError):
        text = (exc.stderr_tail + " " + exc.message).lower()
        return any(
            s in text for s in ("no space left", "could not allocate block", "disk quota", "enospc")
        )
    return False
