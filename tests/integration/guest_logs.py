"""Reading what a guest streamed to the host: the journal files of --log-dir."""

from __future__ import annotations

import json
from pathlib import Path


def journal(path: Path) -> list[dict[str, str]]:
    """The entries of a journal stream; a VM that powered off mid-line leaves its
    last line cut, which is the only line allowed to be incomplete."""
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    return [json.loads(line) for line in lines]


def seqnum(entry: dict[str, str]) -> int:
    """A journal entry's sequence number (systemd 252's JSON has it only in the cursor)."""
    if "__SEQNUM" in entry:
        return int(entry["__SEQNUM"])
    fields = dict(part.split("=", 1) for part in entry["__CURSOR"].split(";"))
    return int(fields["i"], 16)
