"""Locate virtiofsd and build its command line."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from bcvk import run
from bcvk.errors import ToolMissingError

# Where `make virtiofsd` (scripts/fetch-virtiofsd.sh) installs a private copy
# on hosts whose distribution does not package it (Debian 12).
PROJECT_PREFIX = Path("/opt/bcvk/virtiofsd")

# /usr/lib/qemu/virtiofsd is where QEMU < 8 shipped its C virtiofsd (Debian
# 12 still does); it lacks --shared-dir/--readonly, so `usable` rejects it.
SEARCH_PATHS = (
    Path("/usr/libexec/virtiofsd"),
    Path("/usr/lib/virtiofsd"),
    PROJECT_PREFIX / "bin" / "virtiofsd",
    Path("/usr/lib/qemu/virtiofsd"),
)

HINT = (
    "install virtiofsd (Fedora, Ubuntu 24.04+, Debian 13+ package it), "
    "run `make virtiofsd` on Debian 12, or pass --virtiofsd PATH"
)


def find(explicit: str | None = None) -> Path | None:
    """Search order: --virtiofsd, $BCVK_VIRTIOFSD, $VIRTIOFSD_BIN, PATH, SEARCH_PATHS."""
    for candidate in (
        explicit,
        os.environ.get("BCVK_VIRTIOFSD"),
        os.environ.get("VIRTIOFSD_BIN"),
    ):
        if candidate:
            path = Path(candidate)
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise ToolMissingError(f"virtiofsd {candidate} is not an executable file", HINT)
            return path
    on_path = run.find_binary("virtiofsd")
    candidates = [on_path] if on_path else []
    for found in (*candidates, *SEARCH_PATHS):
        if found.is_file() and os.access(found, os.X_OK) and usable(found):
            return found
    return None


@functools.cache
def usable(path: Path) -> bool:
    """False for the legacy C virtiofsd, whose command line differs."""
    result = run.run([path, "--help"], check=False, timeout=10)
    return "--shared-dir" in (result.stdout or "") + (result.stderr or "")


def require(explicit: str | None = None) -> Path:
    path = find(explicit)
    if path is None:
        raise ToolMissingError("virtiofsd not found", hint=HINT)
    return path


def version(path: Path) -> str | None:
    result = run.run([path, "--version"], check=False)
    text = (result.stdout or result.stderr or "").strip()
    return text.splitlines()[0] if result.returncode == 0 and text else None


def argv(
    binary: Path,
    shared_dir: Path,
    socket: Path | None,
    *,
    readonly: bool,
    sandbox: str = "none",
    fd: int | None = None,
    allow_mmap: bool = False,
    cache: str = "never",
) -> list[str]:
    """virtiofsd serving SHARED_DIR on SOCKET.

    ``--cache=never`` by default because the host side may change under a rw
    share and the guest must see it (an image that never changes can use
    ``always``); ``--sandbox=none`` because the process already runs
    in podman's namespace when rootless and needs no chroot of its own.
    """
    args = [
        os.fspath(binary),
        "--shared-dir", os.fspath(shared_dir),
        "--cache", cache,
        "--sandbox", sandbox,
        "--log-level", "error",
    ]  # fmt: skip
    # FD: a listening socket the caller bound and passed down, so that QEMU
    # can connect before virtiofsd has even started.
    if fd is not None:
        args += ["--fd", str(fd)]
    elif socket is not None:
        args += ["--socket-path", os.fspath(socket)]
    else:
        raise ValueError("virtiofsd needs a socket path or a listening fd")
    if readonly:
        args.append("--readonly")
    if allow_mmap:
        # Executables are mmapped; safe only for a share nobody else writes.
        args.append("--allow-mmap")
    return args
