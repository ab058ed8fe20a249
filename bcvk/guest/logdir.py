"""``--log-dir [STREAMS=]DIR``: where a VM's console and journal streams land.

Shared by ephemeral VMs (QEMU's chardevs) and libvirt's (``<channel>`` and
``<log>``): the guest writes them through bcvk's virtio-serial ports
(``bcvk.guest.initrd``), the host appends them to files in DIR.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bcvk import paths
from bcvk.errors import UsageError, os_hint
from bcvk.guest import initrd

# The files in DIR, as upstream names them.
CONSOLE_FILE = "console.txt"
JOURNAL_FILE = "journal.json"
JOURNAL_INITRD_FILE = "journal-initrd.json"


@dataclass(frozen=True)
class LogDir:
    directory: Path
    console: bool = True
    journal: bool = True

    @property
    def console_file(self) -> Path:
        return self.directory / CONSOLE_FILE

    def journal_ports(self) -> tuple[tuple[str, Path], ...]:
        """(virtio-serial port, file) of each journal stream asked for."""
        if not self.journal:
            return ()
        return (
            (initrd.JOURNAL_PORT, self.directory / JOURNAL_FILE),
            (initrd.JOURNAL_INITRD_PORT, self.directory / JOURNAL_INITRD_FILE),
        )

    def files(self) -> tuple[Path, ...]:
        """Every file the streams asked for write in DIR."""
        console = (self.console_file,) if self.console else ()
        return (*console, *(path for _, path in self.journal_ports()))


def parse_log_dir(text: str) -> LogDir:
    """``DIR`` (every stream) or upstream's ``STREAMS=DIR`` (``console,journal=DIR``)."""
    streams, sep, directory = text.rpartition("=")
    if not sep:
        streams, directory = "console,journal", text
    names = {s.strip() for s in streams.split(",") if s.strip()}
    unknown = names - {"console", "journal"}
    if unknown or not names or not directory:
        raise UsageError(
            f"invalid --log-dir {text!r}",
            hint="use DIR or console=DIR, journal=DIR, console,journal=DIR",
        )
    path = paths.user_path(directory, "--log-dir").absolute()
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(
                f"--log-dir {path}: exists and is not a directory",
                hint="give a directory, or a path that does not exist yet",
            )
        # Only the last level is made (and removed again if the VM never starts).
        if not path.exists() and not path.parent.is_dir():
            raise UsageError(
                f"--log-dir {path}: directory {path.parent} does not exist",
                hint="create the parent directory first",
            )
    except OSError as exc:
        raise UsageError(f"--log-dir {text!r}: {exc.strerror}", hint=os_hint(exc)) from None
    return LogDir(path, "console" in names, "journal" in names)
