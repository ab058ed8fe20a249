"""What a pb session holds: the per-VM lock, the shared SSH connection, the console copy.

All of it works without libvirt, so that `pb ssh` to a running VM stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import re
import socket
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from bcvk import paths
from bcvk import run as proc
from bcvk.errors import BcvkError
from bcvk.host import ssh as sshlib
from bcvk.log import logger
from bcvk.pb.model import (
    CONTROL_PERSIST,
    DOMAIN_PREFIX,
    ID_RE,
    LOCK_WAIT,
    MAX_CONTROL_PATH,
    PbVm,
    effective_uri,
)
from bcvk.wait import Deadline, wait_until


def control_path(
    vm_id: str, port: int, user: str, uri: str, directory: Path | None = None
) -> Path | None:
    """Where the shared SSH connection's socket lives; None when the path is too long.

    The name carries everything `pb ssh` needs to use it without asking
    libvirt: ID, port, user and (hashed) URI.
    """
    import hashlib

    base = directory or lock_dir()
    safe_user = re.sub(r"[^A-Za-z0-9_.]", "_", user)[:32]
    uri_hash = hashlib.sha256(uri.encode()).hexdigest()[:6]
    path = base / f"{vm_id}-{port}-{safe_user}-{uri_hash}.ssh"
    return path if len(os.fsencode(path)) <= MAX_CONTROL_PATH else None


_SOCKET_RE = re.compile(
    r"^(?P<id>[0-9a-f]{12})-(?P<port>\d+)-(?P<user>[A-Za-z0-9_.]+)-(?P<uri>[0-9a-f]{6})\.ssh$"
)


def shared_connection(
    ref: str | None, user: str | None, uri: str | None, directory: Path | None = None
) -> tuple[str, int, str, Path] | None:
    """(ID, port, user, socket) of a live shared connection to VM REF, found without libvirt.

    Only for a full ID (or the podman-bootc-<ID> name) with exactly one live
    connection for that user and URI; anything else takes the libvirt path.
    A live master means a running guest: it exits when the guest's side
    closes, and stop/rm end it.
    """
    if ref is None:
        return None
    vm_id = ref.removeprefix(DOMAIN_PREFIX)
    if not ID_RE.fullmatch(vm_id):
        return None
    base = directory or paths.runtime_dir() / "pb"
    if not base.is_dir():
        return None
    import hashlib

    uri_hash = hashlib.sha256(effective_uri(uri).encode()).hexdigest()[:6]
    found = []
    for path in base.glob(f"{vm_id}-*.ssh"):
        match = _SOCKET_RE.match(path.name)
        if match is None or match["uri"] != uri_hash:
            continue
        if user is not None and match["user"] != user:
            continue
        found.append((vm_id, int(match["port"]), match["user"], path))
    if len(found) != 1 or not _socket_alive(found[0][3]):
        return None
    return found[0]


# ------------------------------------------------------------------ locks


def lock_dir() -> Path:
    paths.ensure_private_dir(paths.runtime_dir())
    return paths.ensure_private_dir(paths.runtime_dir() / "pb")


def lock_path(vm_id: str) -> Path:
    return lock_dir() / f"{vm_id}.lock"


class InUseError(BcvkError):
    pass


def in_use_error(vm_id: str, name: str, what: str) -> InUseError:
    return InUseError(
        f"cannot {what} VM {vm_id} ({name}): an SSH session (`pb run` or `pb ssh`) is open",
        hint="close that session first; -f does not override this",
    )


class VmLock:
    """The per-VM flock: shared for sessions, exclusive (never waiting) for stop/rm."""

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        self.path = lock_path(vm_id)
        self.fd: int | None = None

    def _open(self) -> int:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self.fd

    def shared(self, wait: float = LOCK_WAIT) -> None:
        fd = self._open()

        def take() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        wait_until(take, Deadline(wait), f"the lock of VM {self.vm_id}", interval=0.2)

    def try_exclusive(self) -> bool:
        """Take (or upgrade to) the exclusive lock; False when a session holds it."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> VmLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def locked_inodes(proc_locks: str) -> set[tuple[int, int, int]]:
    """(major, minor, inode) of every flock in /proc/locks text (pure)."""
    found: set[tuple[int, int, int]] = set()
    for line in proc_locks.splitlines():
        fields = line.split()
        if len(fields) < 6 or "FLOCK" not in fields[1:3]:
            continue
        ident = next((f for f in fields if f.count(":") == 2), None)
        if ident is None:
            continue
        major, minor, inode = ident.split(":")
        with contextlib.suppress(ValueError):
            found.add((int(major, 16), int(minor, 16), int(inode)))
    return found


def in_use(vm_id: str, locks: set[tuple[int, int, int]] | None = None) -> bool:
    """Whether any process holds VM_ID's lock, read from /proc/locks without locking."""
    try:
        st = lock_path(vm_id).stat()
    except OSError:
        return False
    if locks is None:
        try:
            locks = locked_inodes(Path("/proc/locks").read_text())
        except OSError:
            return False
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in locks


# ------------------------------------------------------------------ shared SSH connection


def _socket_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(os.fspath(path))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                with contextlib.suppress(OSError):
                    path.unlink()  # a master that died without cleaning up
            return False
    return True


def mux_options(path: Path) -> list[str]:
    return ["-o", f"ControlPath={path}", "-o", "ControlMaster=no"]


def ensure_master(target: sshlib.Target, vm_id: str, uri: str | None) -> Path | None:
    """A shared SSH connection to TARGET (started if needed); None when unavailable.

    The master runs detached with /dev/null as stdio, so that callers capturing
    our output are never held open by it; it exits after CONTROL_PERSIST idle
    seconds, when the guest goes away, or on `pb stop`/`pb rm`.
    """
    path = control_path(vm_id, target.port, target.user, effective_uri(uri))
    if path is None:
        logger.debug("runtime dir path too long for an SSH control socket; not sharing")
        return None
    if path.exists() and _socket_alive(path):
        return path
    # A loaded TCG guest can take many seconds to send its SSH banner.
    slow = dataclasses.replace(target, connect_timeout=60)
    argv = sshlib.argv(
        slow,
        (),
        extra=[
            "-M", "-N", "-f",
            "-o", f"ControlPath={path}",
            "-o", f"ControlPersist={CONTROL_PERSIST}",
        ],
    )  # fmt: skip
    for attempt in (1, 2):
        master = proc.spawn(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            die_with_parent=False,
            new_session=True,
        )
        try:
            status = master.wait(timeout=120)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()
            status = -9
        if status == 0 and path.exists():
            return path
        logger.debug("shared SSH connection attempt %d failed (exit %s)", attempt, status)
    return None


def close_masters(vm_id: str) -> None:
    """End every shared SSH connection to VM_ID."""
    directory = paths.runtime_dir() / "pb"
    if not directory.is_dir():
        return
    ssh_bin = proc.find_binary("ssh")
    for path in directory.glob(f"{vm_id}-*.ssh"):
        if ssh_bin is not None and _socket_alive(path):
            proc.run(
                [ssh_bin, "-F", "none", "-o", f"ControlPath={path}", "-O", "exit", "x"],
                check=False,
                timeout=10,
            )
        with contextlib.suppress(OSError):
            path.unlink()


def ssh_argv(
    vm: PbVm, command: Sequence[str], *, user: str | None, tty: bool | None, share: bool
) -> list[str]:
    target = vm.target(user)
    extra: list[str] = []
    if share:
        path = ensure_master(target, vm.id, vm.vm.uri or None)
        if path is not None:
            extra = mux_options(path)
    return sshlib.argv(target, command, tty=tty, extra=extra)


# ------------------------------------------------------------------ console


class ConsoleFollower:
    """Copies what the guest writes to its serial console log to STREAM while it runs."""

    def __init__(self, path: str | None, stream: IO[str]) -> None:
        self.path = Path(path) if path else None
        self.stream = stream
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.offset = 0

    def __enter__(self) -> ConsoleFollower:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.offset = self.path.stat().st_size
            self.thread = threading.Thread(target=self._follow, daemon=True)
            self.thread.start()
        return self

    def _copy(self) -> None:
        assert self.path is not None
        try:
            with self.path.open("rb") as fh:
                if fh.seek(0, os.SEEK_END) < self.offset:
                    self.offset = 0  # the log was truncated
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return
        if data:
            self.offset += len(data)
            text = data.decode(errors="replace").replace("\r\n", "\n").replace("\r", "")
            with contextlib.suppress(OSError, ValueError):
                self.stream.write(text)
                self.stream.flush()

    def _follow(self) -> None:
        while not self.stop_event.wait(0.3):
            self._copy()
        self._copy()

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=2)
