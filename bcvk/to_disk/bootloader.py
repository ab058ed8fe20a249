"""systemd-boot on a FAT EFI system partition, built as a file: no mount.

The ESP content is staged as a directory (bootloader, kernel, initramfs,
Boot Loader Specification entry), then ``mkfs.vfat`` formats a file and
``mcopy`` copies the staged tree into it.  Rendering is pure; ``build_esp``
runs the two tools.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bcvk import run

# systemd-boot's file name and the removable-media path firmware boots.
EFI_ARCH = {
    "x86_64": ("systemd-bootx64.efi", "BOOTX64.EFI"),
    "aarch64": ("systemd-bootaa64.efi", "BOOTAA64.EFI"),
    "riscv64": ("systemd-bootriscv64.efi", "BOOTRISCV64.EFI"),
}
SYSTEMD_BOOT_DIR = "/usr/lib/systemd/boot/efi"


def systemd_boot_name(arch: str) -> str:
    return EFI_ARCH[arch][0]


def host_systemd_boot(arch: str) -> Path | None:
    path = Path(SYSTEMD_BOOT_DIR) / systemd_boot_name(arch)
    return path if path.is_file() else None


@dataclass(frozen=True)
class BootEntry:
    """One BLS type #1 entry: ``loader/entries/<id>.conf`` on the ESP."""

    entry_id: str  # file name without .conf
    title: str
    version: str
    linux: str  # path on the ESP
    initrd: str | None
    options: tuple[str, ...]
    sort_key: str | None = None
    # More initrds after the image's: the kernel unpacks them in order.
    extra_initrds: tuple[str, ...] = ()


def kernel_cmdline(root_fs_uuid: str, kargs: Sequence[str]) -> tuple[str, ...]:
    """``root=UUID=… rw`` followed by the user's arguments, in order."""
    return (f"root=UUID={root_fs_uuid}", "rw", *kargs)


def entry_token(os_release: dict[str, str]) -> str:
    """The BLS entry token: the OS id (machine-id is empty until first boot)."""
    token = os_release.get("ID") or "linux"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in token)


def make_entry(
    os_release: dict[str, str],
    kernel_version: str,
    options: Sequence[str],
    *,
    has_initrd: bool = True,
    extra_initrds: tuple[str, ...] = (),
) -> BootEntry:
    token = entry_token(os_release)
    title = os_release.get("PRETTY_NAME") or os_release.get("NAME") or token
    base = f"/{token}/{kernel_version}"
    return BootEntry(
        entry_id=f"{token}-{kernel_version}",
        title=title,
        version=kernel_version,
        linux=f"{base}/linux",
        initrd=f"{base}/initrd" if has_initrd else None,
        options=tuple(options),
        sort_key=token,
        extra_initrds=extra_initrds,
    )


def render_entry(entry: BootEntry) -> str:
    lines = [
        f"title {entry.title}",
        f"version {entry.version}",
    ]
    if entry.sort_key:
        lines.append(f"sort-key {entry.sort_key}")
    lines.append(f"linux {entry.linux}")
    if entry.initrd:
        lines.append(f"initrd {entry.initrd}")
    lines += [f"initrd {path}" for path in entry.extra_initrds]
    lines.append("options " + " ".join(entry.options))
    return "\n".join(lines) + "\n"


def render_loader_conf(default_entry: str | None) -> str:
    # No menu: a VM disk boots its one entry at once (hold a key for the menu).
    lines = ["timeout 0"]
    if default_entry:
        lines.append(f"default {default_entry}.conf")
    lines.append("editor yes")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class EspFiles:
    """Host paths of what goes onto the ESP, already copied out of the image."""

    systemd_boot: Path
    kernel: Path
    initrd: Path | None
    uki: bool = False
    # The entry's extra_initrds: (path on the ESP, content)
    extra_initrds: tuple[tuple[str, bytes], ...] = ()


def stage_esp(
    stage: Path, files: EspFiles, entry: BootEntry | None, arch: str, uki_name: str = ""
) -> None:
    """Lay the ESP out as a directory under STAGE (moving FILES into place)."""
    boot_name, removable = EFI_ARCH[arch]
    (stage / "EFI" / "BOOT").mkdir(parents=True)
    (stage / "EFI" / "systemd").mkdir(parents=True)
    (stage / "loader" / "entries").mkdir(parents=True)
    data = files.systemd_boot.read_bytes()
    (stage / "EFI" / "BOOT" / removable).write_bytes(data)
    (stage / "EFI" / "systemd" / boot_name).write_bytes(data)
    if files.uki:
        (stage / "EFI" / "Linux").mkdir(parents=True)
        os.replace(files.kernel, stage / "EFI" / "Linux" / uki_name)
        (stage / "loader" / "loader.conf").write_text(render_loader_conf(None))
        return
    assert entry is not None
    kdir = stage / entry.linux.lstrip("/").rsplit("/", 1)[0]
    kdir.mkdir(parents=True)
    os.replace(files.kernel, stage / entry.linux.lstrip("/"))
    if files.initrd is not None and entry.initrd:
        os.replace(files.initrd, stage / entry.initrd.lstrip("/"))
    for path, data in files.extra_initrds:
        (stage / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (stage / path.lstrip("/")).write_bytes(data)
    (stage / "loader" / "entries" / f"{entry.entry_id}.conf").write_text(render_entry(entry))
    (stage / "loader" / "loader.conf").write_text(render_loader_conf(entry.entry_id))


def efi_binaries(stage: Path, entry: BootEntry | None, arch: str, uki_name: str = "") -> list[Path]:
    """The files of a staged ESP that firmware or systemd-boot verifies under
    Secure Boot: systemd-boot (both copies) and the kernel or UKI."""
    boot_name, removable = EFI_ARCH[arch]
    found = [stage / "EFI" / "BOOT" / removable, stage / "EFI" / "systemd" / boot_name]
    if entry is None:
        return [*found, stage / "EFI" / "Linux" / uki_name]
    return [*found, stage / entry.linux.lstrip("/")]


def mkfs_vfat_argv(image: Path, volume_id: str, label: str = "EFI-SYSTEM") -> list[str]:
    mkfs = run.require("mkfs.vfat", *run.sbin("mkfs.vfat"), why="to format the ESP")
    return [
        os.fspath(mkfs),
        "-F", "32", "-n", label, "-i", volume_id, os.fspath(image),
    ]  # fmt: skip


def mcopy_argv(image: Path, stage: Path) -> list[str]:
    sources = sorted(os.fspath(p) for p in stage.iterdir())
    return [
        os.fspath(run.require("mcopy", *run.sbin("mcopy"), why="to fill the EFI system partition")),
        "-s", "-p", "-Q", "-i", os.fspath(image), *sources, "::/",
    ]  # fmt: skip


def build_esp(image: Path, size: int, stage: Path, volume_id: str) -> None:
    """Format IMAGE (SIZE bytes) as FAT32 and copy STAGE's tree into it."""
    with open(image, "wb") as f:
        f.truncate(size)
    run.run(mkfs_vfat_argv(image, volume_id))
    # mtools reads ~/.mtoolsrc; an unrelated config must not change the result
    run.run(mcopy_argv(image, stage), env={"MTOOLSRC": "/dev/null", "MTOOLS_SKIP_CHECK": "1"})


def describe(entry: BootEntry) -> str:
    return f"{entry.title} ({entry.version}): {shlex.join(entry.options)}"
