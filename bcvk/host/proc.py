"""Processes of this host, told apart by more than their pid.

A pid is reused; a pid with its start time (``/proc/PID/stat`` field 22, in
clock ticks since boot) within one boot (``boot_id``) is not.  Records that
outlive a killed bcvk name processes this way, so that a recycled pid is
never mistaken for the process that wrote them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

R = TypeVar("R")


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


def load_record(path: Path, cls: Callable[..., R]) -> R | None:
    """A JSON record whose ``process`` field is an ``Identity``; None when unreadable."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        data["process"] = Identity(**data["process"])
        return cls(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def dead_records(
    paths: Iterator[Path] | list[Path],
    load: Callable[[Path], R | None],
    wanted: Callable[[R], bool] = lambda record: True,
) -> Iterator[R]:
    """The records among PATHS left by processes that are gone, each claimed first.

    A record is claimed by renaming it, so of two processes reaping at once
    exactly one undoes it; the claim is removed once the caller is done.
    Unreadable records (a write cut short) are removed too.
    """
    for path in sorted(paths):
        record = load(path)
        process = getattr(record, "process", None)
        if record is not None and (not wanted(record) or (process and process.alive())):
            continue
        claimed = path.with_name(".reaping-" + path.name)
        try:
            path.rename(claimed)
        except FileNotFoundError:
            continue
        try:
            if record is not None:
                yield record
        finally:
            claimed.unlink(missing_ok=True)
