"""The initramfs archive bcvk appends at boot: bootc's layout and bcvk's guest services.

Linux unpacks every cpio archive concatenated into the initramfs, later
members replacing earlier ones, so one more archive after the image's own
adds files without touching the image.  This one carries, for both kinds of
initramfs bcvk boots:

- ``/bcvk/layout.sh``: mounts a writable ``/etc`` (overlay) and ``/var``
  (a tmpfs copy) over the read-only root, and installs the units and udev
  rules below into the booted system's ``/run``;
- a systemd initrd: ``bcvk-layout.service`` (run after ``sysroot.mount``)
  and the initrd's journal stream;
- initramfs-tools: ``conf/conf.d/zz-bcvk``, which appends the layout step to
  ``init-bottom``;
- for the booted system: the journal stream, the boot report the host reads
  when SSH does not answer, and ``--execute``'s unit.  Each starts only when
  QEMU has given the VM its virtio-serial port (a udev rule), so a VM without
  the port runs none of it.

``archive()`` is pure: the same files give the same bytes (mtime 0, fixed
inode numbers), so the archive's digest names the cached initramfs.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shlex
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from bcvk.errors import UsageError, os_hint
from bcvk.guest.mounts import Share, mount_unit, mount_unit_name

# The virtio-serial ports (QEMU's virtserialport name=; /dev/virtio-ports/NAME).
JOURNAL_PORT = "org.bcvk.journal"
JOURNAL_INITRD_PORT = "org.bcvk.journal.initrd"
STATUS_PORT = "org.bcvk.status"
EXECUTE_STDOUT_PORT = "org.bcvk.execute.stdout"
EXECUTE_STDERR_PORT = "org.bcvk.execute.stderr"
EXECUTE_STATUS_PORT = "org.bcvk.execute.status"
# The system credential --execute's script arrives as.
EXECUTE_CREDENTIAL = "bcvk.execute"

_INITRD_UNITS = "etc/systemd/system"
# Where a disk bcvk builds for libvirt keeps the disk variant, on its ESP: the
# boot entry loads it as a second initrd after the image's own.
DISK_ARCHIVE = "/bcvk/guest.img"


@dataclass(frozen=True)
class Member:
    path: str  # relative, no leading slash
    mode: int  # full st_mode
    data: bytes = b""  # a symlink's target for links


def _text(name: str) -> bytes:
    return resources.files("bcvk.guest").joinpath("initrd_files", name).read_bytes()


def members(disk: bool = False) -> list[Member]:
    """Every file, link and directory of the archive, parents first.

    DISK: the variant a disk's boot entry loads (``DISK_ARCHIVE``): the same
    services, and a marker telling ``layout.sh`` the root is writable already.
    """
    files: dict[str, bytes] = {
        "bcvk/layout.sh": _text("layout.sh"),
        "bcvk/70-bcvk.rules": _text("70-bcvk.rules"),
        "bcvk/libexec/status.sh": _text("status.sh"),
        "bcvk/libexec/execute-done.sh": _text("execute-done.sh"),
        "bcvk/system/bcvk-journal.service": _text("bcvk-journal.service"),
        "bcvk/system/bcvk-status.service": _text("bcvk-status.service"),
        "bcvk/system/bcvk-execute.service": _text("bcvk-execute.service"),
        f"{_INITRD_UNITS}/bcvk-layout.service": _text("bcvk-layout.service"),
        f"{_INITRD_UNITS}/bcvk-journal-initrd.service": _text("bcvk-journal-initrd.service"),
        "etc/udev/rules.d/70-bcvk-initrd.rules": _text("70-bcvk-initrd.rules"),
        "conf/conf.d/zz-bcvk": _text("initramfs-tools.conf"),
    }
    if disk:
        files["bcvk/disk"] = b""
    links = {f"{_INITRD_UNITS}/initrd.target.wants/bcvk-layout.service": "../bcvk-layout.service"}
    dirs: set[str] = set()
    for path in (*files, *links):
        parts = path.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    out = [Member(d, stat.S_IFDIR | 0o755) for d in sorted(dirs)]
    out += [Member(p, stat.S_IFREG | 0o644, data) for p, data in sorted(files.items())]
    out += [Member(p, stat.S_IFLNK | 0o777, t.encode()) for p, t in sorted(links.items())]
    return out


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, member: Member, name: bytes) -> bytes:
    nlink = 2 if stat.S_ISDIR(member.mode) else 1
    fields = (ino, member.mode, 0, 0, nlink, 0, len(member.data), 0, 0, 0, 0, len(name) + 1, 0)
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def cpio(entries: list[Member]) -> bytes:
    """ENTRIES as one uncompressed newc archive (what the kernel unpacks)."""
    out = bytearray()
    for ino, member in enumerate([*entries, Member("TRAILER!!!", 0)], start=1):
        name = member.path.encode()
        head = _header(0 if member.path == "TRAILER!!!" else ino, member, name) + name + b"\0"
        out += head + _pad4(len(head)) + member.data + _pad4(len(member.data))
    out += _pad4(len(out))
    return bytes(out)


def archive(disk: bool = False) -> bytes:
    """bcvk's initramfs archive (see the module's docstring)."""
    return cpio(members(disk))


def modules_archive(modules: dict[str, bytes]) -> bytes:
    """Kernel modules the initramfs lacks, from the image, for layout.sh to insmod."""
    files = [
        Member(f"bcvk/modules/{name}", stat.S_IFREG | 0o644, data) for name, data in modules.items()
    ]
    dirs = [Member("bcvk", stat.S_IFDIR | 0o755), Member("bcvk/modules", stat.S_IFDIR | 0o755)]
    return cpio([*dirs, *sorted(files, key=lambda m: m.path)])


def disk_archive() -> bytes:
    """The disk variant as a boot entry's second ``initrd`` (``DISK_ARCHIVE``), gzipped.

    systemd-boot hands the kernel its initrds end to end, unpadded, and the
    kernel takes an uncompressed archive only at a 4-byte offset: after an
    initrd whose size is not a multiple of 4 a plain cpio is "invalid magic
    at start of compressed archive" and is skipped (found with a Debian
    initrd of 27281099 bytes).  A compressed archive may start anywhere.
    """
    return gzip.compress(archive(disk=True), mtime=0)


def digest(disk: bool = False) -> str:
    data = disk_archive() if disk else archive()
    return hashlib.sha256(data).hexdigest()[:16]


def execute_script(commands: tuple[str, ...], setup: tuple[str, ...] = ()) -> str:
    """The ``bcvk.execute`` credential: SETUP (share mounts, swap), then each
    command in its own shell, stopping at the first failure."""
    lines = ["# bcvk --execute"]
    lines += [f"{{ {step}; }} || {{ echo 'bcvk: setup failed: {shlex.quote(step)}' >&2; exit 1; }}"
              for step in setup]  # fmt: skip
    lines += [f"sh -c {shlex.quote(command)} || exit $?" for command in commands]
    return "\n".join(lines) + "\n"


# --systemd-units: what a directory of units may hold (upstream's flag).
UNIT_SUFFIXES = (
    ".service", ".socket", ".target", ".mount", ".automount", ".swap", ".timer", ".path",
    ".slice", ".scope",
)  # fmt: skip
UNITS_DIR = "bcvk/units"  # in the archive; layout.sh copies it to /run/systemd/system
_DEPENDENCY_DIRS = (".wants", ".requires", ".upholds", ".d")


def _is_unit_name(name: str) -> bool:
    return name.endswith(UNIT_SUFFIXES) and len(name) > len(name.rsplit(".", 1)[1]) + 1


def units_members(directory: Path) -> tuple[Member, ...]:
    """The unit files of DIRECTORY (with their ``*.wants/`` etc.), for the archive.

    Read and checked here, once: a file that is not a unit, a link out of
    the tree, or anything else unexpected is a ``UsageError``.
    """
    flag = f"--systemd-units {directory}"
    hint = "give a directory of unit files"
    try:
        children = sorted(directory.iterdir())
    except FileNotFoundError:
        raise UsageError(f"{flag}: no such directory", hint=hint) from None
    except NotADirectoryError:
        raise UsageError(f"{flag}: not a directory", hint=hint) from None
    except OSError as exc:
        raise UsageError(f"{flag}: {exc.strerror}", hint=os_hint(exc)) from None
    out = [Member(UNITS_DIR, stat.S_IFDIR | 0o755)]
    for child in children:
        name = child.name
        if child.is_dir() and not child.is_symlink() and name.endswith(_DEPENDENCY_DIRS):
            out.append(Member(f"{UNITS_DIR}/{name}", stat.S_IFDIR | 0o755))
            try:
                entries = sorted(child.iterdir())
            except OSError as exc:  # an unreadable *.wants/ is bad input, not a crash
                raise UsageError(f"{flag}: {name}: {exc.strerror}", hint=os_hint(exc)) from None
            for entry in entries:
                if not _is_unit_name(entry.name) and not entry.name.endswith(".conf"):
                    raise UsageError(
                        f"{flag}: {name}/{entry.name} is not a unit or drop-in",
                        hint="a *.wants/ or *.requires/ directory holds links named after units",
                    )
                out.append(_unit_member(f"{UNITS_DIR}/{name}/{entry.name}", entry, flag))
        elif _is_unit_name(name) and (child.is_file() or child.is_symlink()):
            member = _unit_member(f"{UNITS_DIR}/{name}", child, flag)
            if stat.S_ISREG(member.mode) and b"[" not in member.data:
                raise UsageError(
                    f"{flag}: {name} is not a unit file (it has no [Section])",
                    hint="a unit file starts with a section such as [Unit] or [Service]",
                )
            out.append(member)
        else:
            raise UsageError(
                f"{flag}: {name} is not a unit file or a *.wants/ directory",
                hint=f"unit files end in {', '.join(UNIT_SUFFIXES[:4])}…",
            )
    if len(out) == 1:
        raise UsageError(f"{flag}: no unit files in it", hint="add NAME.service files")
    return tuple(out)


def _unit_member(path: str, source: Path, flag: str) -> Member:
    if source.is_symlink():
        # Kept as a link: systemd reads a *.wants/ entry by its name.
        return Member(path, stat.S_IFLNK | 0o777, os.readlink(source).encode())
    if not source.is_file():
        raise UsageError(f"{flag}: {source.name} is not a regular file", hint="give unit files")
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag}: {source.name}: {exc.strerror}", hint=os_hint(exc)) from None
    if b"\0" in data:
        raise UsageError(f"{flag}: {source.name} is not a text file", hint="give unit files")
    return Member(path, stat.S_IFREG | 0o644, data)


def mount_members(shares: Iterable[Share]) -> list[Member]:
    """Mount units for SHARES, pulled in by local-fs.target, as archive members."""
    out: list[Member] = []
    for share in shares:
        name = mount_unit_name(share.target)
        text = mount_unit(share).encode()
        out.append(Member(f"{UNITS_DIR}/{name}", stat.S_IFREG | 0o644, text))
        out.append(Member(f"{UNITS_DIR}/local-fs.target.wants/{name}", stat.S_IFLNK | 0o777,
                          f"../{name}".encode()))  # fmt: skip
    if out:
        out.insert(0, Member(f"{UNITS_DIR}/local-fs.target.wants", stat.S_IFDIR | 0o755))
    return out


def with_units(base: Path, units: tuple[Member, ...], out: Path) -> Path:
    """BASE (an initramfs ending in bcvk's archive) plus the UNITS archive, written to OUT."""
    with base.open("rb") as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.write(b"\0" * (-dst.tell() % 4))
        dst.write(cpio([Member("bcvk", stat.S_IFDIR | 0o755), *units]))
    return out
