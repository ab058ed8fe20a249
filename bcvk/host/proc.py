"""Processes of this host, told apart by more than their pid.

A pid is reused; a pid with its start time (``/proc/PID/stat`` field 22, in
clock ticks since boot) within one boot (``boot_id``) is not.  Records that
outlive a killed bcvk name processes this way, so that a recycled pid is
never mistaken for the process that wrote them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 on (the command name may hold spaces and ')')."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The start time of PID in clock ticks since boot, or None if it is gone."""
    rest = _stat_fields(pid)
    if not rest or rest[0] == "Z":
        return None  # gone, or a zombie: it has exited, only its parent's wait is missing
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def process_group(pid: int) -> int | None:
    rest = _stat_fields(pid)
    try:
        return int(rest[2]) if rest else None
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Identity:
    """One process of one boot of this host."""

    pid: int
    started: int
    boot: str

    @classmethod
    def current(cls) -> Identity:
        pid = os.getpid()
        return cls(pid, start_time(pid) or -1, boot_id())

    def alive(self) -> bool:
        return self.boot == boot_id() and start_time(self.pid) == self.started
