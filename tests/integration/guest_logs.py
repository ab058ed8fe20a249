"""Reading what a guest wrote to the host: the journal files of --log-dir, its console."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def journal(path: Path) -> list[dict[str, str]]:
    """The entries of a journal stream.  Each boot's stream starts with a newline,
    so a boot that powered off mid-entry leaves one cut line, the last of its
    boot: only such a line (before a blank line, or at the end) may be incomplete."""
    lines = path.read_text(errors="replace").split("\n")
    entries = []
    for index, line in enumerate(lines):
        if not line:
            continue
        try:
            entries.append(json.loads(line))
        except ValueError:
            if index + 1 < len(lines) and lines[index + 1]:
                raise
    return entries


def seqnum(entry: dict[str, str]) -> int:
    """A journal entry's sequence number (systemd 252's JSON has it only in the cursor)."""
    if "__SEQNUM" in entry:
        return int(entry["__SEQNUM"])
    fields = dict(part.split("=", 1) for part in entry["__CURSOR"].split(";"))
    return int(fields["i"], 16)


def halt_in_the_kernel(
    console: Path, halt: Callable[[], object], proc: subprocess.Popen[str], timeout: float
) -> None:
    """Call HALT (pause the vCPUs) as soon as CONSOLE shows the kernel starting:
    a guest stopped where QEMU's TCG hang leaves one, before init ran."""
    deadline = time.monotonic() + timeout
    while not console.is_file() or b"] Linux version" not in console.read_bytes():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the kernel never started"
        time.sleep(0.05)
    halt()
    halted = console.read_text(errors="replace")
    assert "as init process" not in halted, "halted too late: the kernel had run init"
