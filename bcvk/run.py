"""The one place that starts child processes.

Every command is an argv list (never a shell string), logged at debug level in
copy-pasteable form, and a failure becomes a ``CommandError`` carrying argv,
exit status and the tail of stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from bcvk.errors import CommandError, ToolMissingError
from bcvk.log import logger

Argv = Sequence[str | os.PathLike[str]]
# A long-running child started by ``spawn``; other modules name it by this
# alias, as they may not touch ``subprocess``'s process API themselves.
Process = subprocess.Popen[bytes]

# Debian / Fedora package providing each host tool, for hints and `doctor`.
PACKAGES: dict[str, tuple[str, str]] = {
    "podman": ("podman", "podman"),
    "qemu-system-x86_64": ("qemu-system-x86", "qemu-system-x86-core"),
    "qemu-img": ("qemu-utils", "qemu-img"),
    "virtiofsd": ("virtiofsd (Debian 13+; `make virtiofsd` on 12)", "virtiofsd"),
    "ssh": ("openssh-client", "openssh-clients"),
    "sbsign": ("sbsigntool", "sbsigntools"),
    "ssh-keygen": ("openssh-client", "openssh-clients"),
    "mkfs.ext4": ("e2fsprogs", "e2fsprogs"),
    "mkfs.xfs": ("xfsprogs", "xfsprogs"),
    "mkfs.btrfs": ("btrfs-progs", "btrfs-progs"),
    "mkfs.vfat": ("dosfstools", "dosfstools"),
    "debugfs": ("e2fsprogs", "e2fsprogs"),
    "xfs_db": ("xfsprogs", "xfsprogs"),
    "mcopy": ("mtools", "mtools"),
    "sfdisk": ("fdisk", "util-linux"),
    "newuidmap": ("uidmap", "shadow-utils"),
    "swtpm": ("swtpm", "swtpm"),
    "xorriso": ("xorriso", "xorriso"),
    "virsh": ("libvirt-clients", "libvirt-client"),
}


def package_hint(tool: str) -> str:
    debian, fedora = PACKAGES.get(tool, (tool, tool))
    return f"install it: apt-get install {debian} (Debian/Ubuntu) or dnf install {fedora} (Fedora)"


def find_binary(name: str, *fallbacks: str | Path) -> Path | None:
    """Find NAME on PATH, else the first existing executable fallback path."""
    found = shutil.which(name)
    if found:
        return Path(found)
    for candidate in fallbacks:
        path = Path(candidate)
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def sbin(name: str) -> tuple[Path, ...]:
    """Where Debian/Fedora keep admin tools that a normal user's PATH lacks."""
    return (Path("/usr/sbin") / name, Path("/sbin") / name)


def require(name: str, *fallbacks: str | Path, why: str = "") -> Path:
    path = find_binary(name, *fallbacks)
    if path is None:
        reason = f" (needed {why})" if why else ""
        raise ToolMissingError(f"{name} not found{reason}", hint=package_hint(name))
    return path


@functools.cache
def _prctl() -> Any:
    # Resolved in the parent: dlopen in a child forked from a threaded process can hang.
    return ctypes.CDLL(None, use_errno=True).prctl


def preexec_pdeathsig() -> Callable[[], None]:
    """A preexec_fn after which the child dies with bcvk, even on SIGKILL of bcvk."""
    prctl = _prctl()
    PR_SET_PDEATHSIG = 1
    parent = os.getpid()

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # Killed between fork and prctl, bcvk sent no signal: the child is
        # already an orphan and must not go on to exec.
        if os.getppid() != parent:
            os._exit(1)

    return hook


class _Interrupts:
    """How many interrupting signals bcvk's handler has taken (see ``note_interrupt``)."""

    count = 0


def note_interrupt() -> None:
    """Called by the handler of SIGINT/SIGTERM/SIGHUP before it raises."""
    _Interrupts.count += 1


def _popen(args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen``, without losing a Ctrl-C that arrives as it forks.

    CPython runs the parent's ``os.register_at_fork`` callbacks (logging's
    lock release) where an exception cannot propagate: a KeyboardInterrupt
    raised there is printed as "Exception ignored" and dropped, and the build
    went on to finish (CI saw it once).  A signal taken while Popen ran that
    did not end Popen was dropped so: the child goes, and the interrupt is
    raised here.
    """
    seen = _Interrupts.count
    child = subprocess.Popen(args, **kwargs)
    if _Interrupts.count != seen:
        child.kill()
        child.wait()
        raise KeyboardInterrupt("interrupted while starting a child process")
    return child


def run(
    argv: Argv,
    *,
    check: bool = True,
    capture: bool = True,
    input: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    stdout: int | IO[Any] | None = None,
    stdin: int | IO[Any] | None = None,
    text: bool = True,
    hint: str | None = None,
) -> subprocess.CompletedProcess[Any]:
    """Run a command to completion.

    With ``capture`` stdout and stderr are collected; without it the child's
    stdout goes to *our stderr* so that data on our stdout stays clean, unless
    the caller passes ``stdout`` explicitly.
    """
    args = [os.fspath(a) for a in argv]
    logger.debug("+ %s", shlex.join(args))
    full_env = None
    if env is not None:
        full_env = {**os.environ, **env}
    if stdin is None and input is None:
        stdin = subprocess.DEVNULL
    try:
        child = _popen(
            args,
            stdin=subprocess.PIPE if input is not None else stdin,
            stdout=subprocess.PIPE if capture else (stdout if stdout is not None else 2),
            stderr=subprocess.PIPE if capture else None,
            env=full_env,
            cwd=cwd,
            text=text,
            # A SIGKILLed bcvk must not leave mkfs or qemu-img writing on.
            preexec_fn=preexec_pdeathsig(),
        )
    except FileNotFoundError as exc:
        raise ToolMissingError(f"{args[0]} not found", hint=package_hint(args[0])) from exc
    with child:
        try:
            out, err = child.communicate(input, timeout=timeout)
        except BaseException as exc:
            # Ctrl-C or a timeout: the child is killed and *reaped* before
            # anyone cleans up after it (subprocess.run waits only 0.25 s on
            # Ctrl-C; an mkfs still closing its files keeps the image mount
            # busy, and the unmount that follows fails).
            child.kill()
            child.wait()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise CommandError(
                    args, -signal.SIGKILL, f"timed out after {timeout}s", hint
                ) from exc
            raise
    proc = subprocess.CompletedProcess(args, child.returncode, out, err)
    if check and proc.returncode != 0:
        err = proc.stderr if capture else ""
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        raise CommandError(args, proc.returncode, err or "", hint)
    return proc


def output(argv: Argv, **kwargs: Any) -> str:
    """Run and return stdout as text (stripped of the trailing newline)."""
    result: str = run(argv, **kwargs).stdout
    return result.rstrip("\n")


def spawn(
    argv: Argv,
    *,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    die_with_parent: bool = True,
    new_session: bool = False,
) -> Process:
    """Start a long-running child (a daemon such as QEMU or virtiofsd)."""
    args = [os.fspath(a) for a in argv]
    logger.debug("+ %s &", shlex.join(args))
    full_env = {**os.environ, **env} if env is not None else None
    try:
        return _popen(
            args,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=full_env,
            pass_fds=tuple(pass_fds),
            preexec_fn=preexec_pdeathsig() if die_with_parent else None,
            start_new_session=new_session,
        )
    except FileNotFoundError as exc:
        raise ToolMissingError(f"{args[0]} not found", hint=package_hint(args[0])) from exc


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while tearing down, deliver them afterwards.

    A second Ctrl-C must not abandon a half-finished clean-up; every step
    of the clean-up has its own deadline, so the wait is bounded.
    """
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
