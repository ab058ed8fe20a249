"""What every benchmark here shares: where bcvk is, timing a command, summarising runs.

The scripts are run as `.venv/bin/python bench/NAME.py`, so this folder is on
sys.path and `import benchlib` needs no package.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BCVK = str(ROOT / ".venv" / "bin" / "bcvk")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load() -> float:
    """The 1-minute load average: TCG timings swing with it, so every run prints it."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def run(
    argv: Sequence[str | Path], timeout: float = 2400, env: dict[str, str] | None = None
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ARGV and time it; a failed step ends the benchmark (a figure would be a lie)."""
    args = [os.fspath(a) for a in argv]
    start = time.monotonic()
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return elapsed, result


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], digits: int = 1) -> str:
    """``12.3 s (min 11.0, max 14.1, n=5)``: the median with what it hides."""
    if not values:
        return "-"
    m, lo, hi = median(values), min(values), max(values)
    return f"{m:.{digits}f} s (min {lo:.{digits}f}, max {hi:.{digits}f}, n={len(values)})"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
