"""Facts about an image's root filesystem, read from a mounted tree.

Everything here only reads files below ``root``; absolute symlinks inside the
tree are resolved relative to ``root`` so the host's files are never consulted.
When rootless it runs inside podman's user namespace (``bcvk.image.inns``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

_MAX_LINKS = 40


def resolve(root: Path, path: str) -> Path | None:
    """Resolve PATH (absolute, inside the image) following symlinks within ROOT."""
    parts = list(PurePosixPath(path).parts[1:])
    current = PurePosixPath("/")
    hops = 0
    while parts:
        name = parts.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        candidate = current / name
        host = root / str(candidate).lstrip("/")
        if host.is_symlink():
            hops += 1
            if hops > _MAX_LINKS:
                return None
            target = os.readlink(host)
            if target.startswith("/"):
                current = PurePosixPath("/")
            parts = list(PurePosixPath(target).parts[1 if target.startswith("/") else 0 :]) + parts
            continue
        if not host.exists():
            return None
        current = candidate
    return root / str(current).lstrip("/")


def read_text(root: Path, path: str) -> str | None:
    target = resolve(root, path)
    if target is None or not target.is_file():
        return None
    try:
        return target.read_text(errors="replace")
    except OSError:
        return None


def parse_os_release(text: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        result[key.strip()] = value
    return result


@dataclass(frozen=True)
class Kernel:
    version: str
    kind: str  # "vmlinuz" or "uki"
    path: str  # inside the image
    initramfs: str | None = None


def find_kernels(root: Path) -> list[Kernel]:
    """UKIs first, then ``/usr/lib/modules/<kver>/vmlinuz`` (+ ``initramfs.img``)."""
    kernels: list[Kernel] = []
    seen: set[str] = set()
    for pattern_dir in ("boot/EFI/Linux", "usr/lib/modules/*"):
        for uki in sorted(root.glob(f"{pattern_dir}/*.efi")):
            rel = "/" + str(uki.relative_to(root))
            version = uki.parent.name if pattern_dir.startswith("usr") else uki.stem
            kernels.append(Kernel(version=version, kind="uki", path=rel))
            seen.add(version)
    modules = resolve(root, "/usr/lib/modules")
    if modules is not None and modules.is_dir():
        for kdir in sorted(modules.iterdir()):
            if kdir.name in seen or not (kdir / "vmlinuz").is_file():
                continue
            rel = f"/usr/lib/modules/{kdir.name}"
            initrd = f"{rel}/initramfs.img" if (kdir / "initramfs.img").is_file() else None
            kernels.append(Kernel(kdir.name, "vmlinuz", f"{rel}/vmlinuz", initrd))
    return kernels


def entries(root: Path, directory: str, pattern: str) -> list[str]:
    """Paths (inside the image) of the entries of DIRECTORY matching PATTERN.

    DIRECTORY is resolved within ROOT; the entries are listed, never followed,
    so an image's absolute symlinks cannot point the reader at the host.
    """
    found = resolve(root, directory)
    if found is None or not found.is_dir():
        return []
    base = "/" + os.fspath(found.relative_to(root)) if found != root else ""
    try:
        names = sorted(p.name for p in found.glob(pattern))
    except OSError:
        return []
    return [f"{base}/{name}" for name in names]


def systemd_version(root: Path) -> int | None:
    """The version of systemd in the image, from its shared library's name."""
    for libdir in ("/usr/lib/systemd", "/usr/lib64/systemd", "/usr/lib/x86_64-linux-gnu/systemd"):
        for lib in entries(root, libdir, "libsystemd-shared-*.so"):
            match = re.match(r"libsystemd-shared-(\d+)", PurePosixPath(lib).name)
            if match:
                return int(match.group(1))
    return None


def init_system(root: Path) -> str | None:
    init = resolve(root, "/sbin/init")
    if init is None:
        init = resolve(root, "/usr/sbin/init")
    if init is None:
        return None
    return "systemd" if "systemd" in init.name else init.name


_WANTS_DIRS = ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
SSH_UNITS = ("ssh.service", "sshd.service", "ssh.socket", "sshd.socket")


def unit_enabled(root: Path, units: tuple[str, ...]) -> bool:
    """Whether one of UNITS is wanted by a target, or enabled by a preset."""
    for base in _WANTS_DIRS:
        for wants in entries(root, base, "*.wants"):
            directory = resolve(root, wants)
            # An enablement link may dangle (it is not followed): lexists.
            if directory is not None and any(os.path.lexists(directory / u) for u in units):
                return True
    presets: list[str] = []
    for base in ("/etc/systemd/system-preset", "/usr/lib/systemd/system-preset"):
        presets += entries(root, base, "*.preset")
    for preset in presets:
        for line in (read_text(root, preset) or "").splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "enable" and words[1] in units:
                return True
    return False


def default_target(root: Path) -> str | None:
    """The unit default.target points at (the link may dangle, e.g. to graphical)."""
    for base in ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"):
        parent = resolve(root, base)
        if parent is None:
            continue
        link = parent / "default.target"
        if link.is_symlink():
            return PurePosixPath(os.readlink(link)).name
        if link.exists():
            return "default.target"
    return None


def initramfs_generator(root: Path) -> str:
    if resolve(root, "/usr/bin/dracut") or resolve(root, "/usr/sbin/dracut"):
        return "dracut"
    if resolve(root, "/usr/sbin/mkinitramfs"):
        return "initramfs-tools"
    if resolve(root, "/usr/bin/mkinitcpio"):
        return "mkinitcpio"
    return "other"


def has_selinux_policy(root: Path) -> bool:
    return any(
        resolve(root, f"{policy}/contexts/files/file_contexts") is not None
        for policy in entries(root, "/etc/selinux", "*")
    )
