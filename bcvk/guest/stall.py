"""Telling a guest kernel that has stopped for good from one that is slow.

Under TCG, QEMU now and then leaves a guest hung early in its kernel's boot:
the console stops in the middle of the kernel's messages and nothing else
happens, however long one waits (CI once saw 900 s of silence after
``IP idents hash table entries``, a point every other boot passes in a
fraction of a second).  Until it runs init, a working kernel prints a line
every few seconds even on a loaded host, so a console whose last line is a
kernel message, from before init ran, that has not grown for ``limit``
seconds belongs to a boot that will not finish.  After init a quiet console
is normal, so from then on nothing is concluded.

The verdict needs the kernel's own lines on the console: with ``quiet`` or a
``loglevel=`` on the command line the watch is not armed.  Where bcvk does
not know the command line (a libvirt VM boots its disk's entry) the kernel's
own ``Kernel command line:`` line on the console decides.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from bcvk.errors import BcvkError, UsageError

LIMIT_ENV = "BCVK_BOOT_STALL_TIMEOUT"
DEFAULT_LIMIT = 120.0

_KERNEL_LINE = re.compile(r"\[\s*\d+\.\d+\] ")
# The kernel's last messages before it hands over to init (printed at info level).
_INIT_RAN = re.compile(r"Run \S+ as init process|Freeing unused kernel")
_KERNEL_START = re.compile(r"\] Linux version ")
_CMDLINE = re.compile(r"Kernel command line: (.*)")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_READ = 1 << 20


class KernelStalled(BcvkError):
    """The guest's kernel printed nothing for the watch's limit before running init."""


def limit() -> float:
    """``$BCVK_BOOT_STALL_TIMEOUT`` seconds, else the default; 0 turns the watch off."""
    raw = os.environ.get(LIMIT_ENV, "").strip()
    if not raw:
        return DEFAULT_LIMIT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise UsageError(
            f"${LIMIT_ENV} must be a number of seconds, not {raw!r}",
            hint="e.g. 300 for a very slow host, or 0 to never restart a silent boot",
        )
    return value


def armed(cmdline: str) -> bool:
    """Whether the kernel will print its boot messages, so that silence means something."""
    return not any(arg == "quiet" or arg.startswith("loglevel=") for arg in cmdline.split())


@dataclass
class Watch:
    """Follows a console log as it grows; ``check`` says when the kernel has stalled.

    ARMED None: decided by the kernel's command line once the console shows it.
    OFFSET: where to start reading.  A log that is appended to holds earlier
    boots: each ``Linux version`` line (a kernel starting) begins afresh.
    """

    path: Path
    limit: float
    armed: bool | None = None
    clock: float = field(default_factory=time.monotonic)
    offset: int = 0
    partial: str = ""
    last_line: str = ""
    init_ran: bool = False

    def __post_init__(self) -> None:
        self._armed_at_start = self.armed

    def check(self, now: float | None = None) -> None:
        """Raise ``KernelStalled`` once the kernel has been silent for ``limit`` seconds."""
        now = time.monotonic() if now is None else now
        if self._read():
            self.clock = now
        elif (
            self.armed
            and not self.init_ran
            and now - self.clock >= self.limit
            and _KERNEL_LINE.match(self.last_line)
        ):
            raise KernelStalled(
                f"the guest's kernel printed nothing for {self.limit:.0f}s and never ran init; "
                f"its last line: {self.last_line}",
                hint=f"a known QEMU (TCG) hang; a host this slow may need ${LIMIT_ENV}=SECONDS",
            )

    def _read(self) -> bool:
        """Take in what the console gained; whether it grew."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read(_READ)
        except OSError:
            return False
        if not data:
            return False
        self.offset += len(data)
        lines = (self.partial + data.decode(errors="replace")).replace("\r", "\n").split("\n")
        self.partial = lines.pop()
        for raw in lines:
            line = _ANSI.sub("", raw).strip()
            if not line:
                continue
            self.last_line = line
            if _KERNEL_START.search(line):
                self.init_ran, self.armed = False, self._armed_at_start
            self.init_ran = self.init_ran or bool(_INIT_RAN.search(line))
            if self.armed is None and (cmdline := _CMDLINE.search(line)):
                self.armed = armed(cmdline.group(1))
        return True


def watch(console: Path, cmdline: str | None, seconds: float) -> Watch | None:
    """A watch on CONSOLE for a kernel started with CMDLINE (None: as the console shows).

    None where it could never judge: a zero limit, or ``quiet`` on CMDLINE.
    """
    if seconds == 0 or (cmdline is not None and not armed(cmdline)):
        return None
    return Watch(console, seconds, armed=None if cmdline is None else True)


def follow(console: Path, seconds: float) -> Watch | None:
    """A watch on the part of CONSOLE written from now on (a log that is appended to)."""
    if seconds == 0:
        return None
    try:
        offset = console.stat().st_size
    except OSError:
        offset = 0
    return Watch(console, seconds, offset=offset)
