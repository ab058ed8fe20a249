"""Where bcvk keeps runtime state and caches for the invoking user."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bcvk.errors import BcvkError, UsageError
from bcvk.log import logger


def user_path(text: str, flag: str) -> Path:
    """A path the user typed, ``~`` expanded; ``~nosuchuser`` is a usage error."""
    if "\0" in text:
        raise UsageError(f"{flag} {text!r}: a path cannot hold a NUL byte", hint="fix the path")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # pathlib's "Could not determine home directory"
        raise UsageError(
            f"{flag} {text!r}: cannot expand '~' (no such user or no home directory)",
            hint="write the path out in full",
        ) from None


def runtime_dir() -> Path:
    """``$XDG_RUNTIME_DIR/bcvk``, else ``/run/user/$UID/bcvk``, else a private temp dir.

    Hosts without logind (containers, CI, `su` sessions) have no
    XDG_RUNTIME_DIR, so the last fallback matters in practice.
    """
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return Path(xdg) / "bcvk"
    run_user = Path(f"/run/user/{os.getuid()}")
    if run_user.is_dir() and os.access(run_user, os.W_OK):
        return run_user / "bcvk"
    return Path(tempfile.gettempdir()) / f"bcvk-{os.getuid()}"


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "bcvk"


def data_dir() -> Path:
    """``$XDG_DATA_HOME/bcvk``, else ``~/.local/share/bcvk``: state that must survive reboots."""
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "bcvk"


def ensure_private_dir(path: Path) -> Path:
    """Create PATH as a 0700 directory owned by us, refusing one that is not.

    A shared temp dir lets anyone pre-create our fallback runtime dir, so an
    existing one must be ours and private before we put keys in it.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise BcvkError(
            f"{path} is not a directory owned by uid {os.getuid()}",
            hint="remove it or set XDG_RUNTIME_DIR to a private directory",
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        path.chmod(0o700)
    return path


def write_atomic(target: Path, text: str, mode: int = 0o600) -> None:
    """Replace TARGET with TEXT so readers see the old file or the new, never half.

    The temporary name is unique per writer: two bcvk processes (or threads)
    writing the same file must not rename each other's temporary away.
    """
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.chmod(mode)
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked(
    path: Path, *, shared: bool = False, blocking: bool = True, remove: bool = False
) -> Iterator[bool]:
    """flock PATH for the block; yields False if non-blocking and busy.

    With REMOVE (exclusive locks only) the lock file is deleted on release,
    so locks named after many different things do not pile up.  A waiter
    that opened the file before it was deleted holds a lock on nothing:
    it notices that the path no longer names its file and tries again.
    """
    if remove and shared:
        raise ValueError("a removable lock must be exclusive")
    op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    if not blocking:
        op |= fcntl.LOCK_NB
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, op)
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        if not remove or _same_file(fd, path):
            break
        os.close(fd)
    try:
        yield True
    finally:
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def one_at_a_time(key: str, waiting: str) -> Iterator[None]:
    """An exclusive lock named by KEY (hashed) in the runtime dir, logging WAITING when busy.

    Its file is removed on release: there is one per disk or output path.
    """
    digest = hashlib.sha256(key.encode(errors="surrogateescape")).hexdigest()[:24]
    lock = ensure_private_dir(ensure_private_dir(runtime_dir()) / "locks") / f"{digest}.lock"
    with locked(lock, blocking=False, remove=True) as free:
        if free:
            yield
            return
    logger.info("%s", waiting)
    with locked(lock, remove=True):
        yield


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


_AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


@functools.cache
def _renameat2() -> Any:
    return ctypes.CDLL(None, use_errno=True).renameat2


def renameat2(src: Path, dst: Path, flags: int) -> None:
    """rename(2) with FLAGS (RENAME_NOREPLACE, RENAME_EXCHANGE); OSError as rename's."""
    result = _renameat2()(
        _AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)
    )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fspath(src), None, os.fspath(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename SRC to DST unless DST exists (FileExistsError then), atomically."""
    try:
        renameat2(src, dst, RENAME_NOREPLACE)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        # A filesystem without renameat2 flags: link(2) fails atomically on EEXIST.
        os.link(src, dst)
        os.unlink(src)


def exchange(a: Path, b: Path) -> bool:
    """Swap A and B atomically; False where the filesystem cannot (nothing changed)."""
    try:
        renameat2(a, b, RENAME_EXCHANGE)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS):
            return False
        raise
    return True
