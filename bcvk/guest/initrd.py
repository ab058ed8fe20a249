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

import hashlib
import shlex
import stat
from dataclasses import dataclass
from importlib import resources

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


@dataclass(frozen=True)
class Member:
    path: str  # relative, no leading slash
    mode: int  # full st_mode
    data: bytes = b""  # a symlink's target for links


def _text(name: str) -> bytes:
    return resources.files("bcvk.guest").joinpath("initrd_files", name).read_bytes()


def members() -> list[Member]:
    """Every file, link and directory of the archive, parents first."""
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


def archive() -> bytes:
    """bcvk's initramfs archive (see the module's docstring)."""
    return cpio(members())


def digest() -> str:
    return hashlib.sha256(archive()).hexdigest()[:16]


def execute_script(commands: tuple[str, ...]) -> str:
    """The ``bcvk.execute`` credential: each command in its own shell, stopping at a failure."""
    lines = ["# bcvk --execute"]
    lines += [f"sh -c {shlex.quote(command)} || exit $?" for command in commands]
    return "\n".join(lines) + "\n"
