"""Logging set-up (human or JSON lines on stderr, never on stdout), and log-file tails."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

logger = logging.getLogger("bcvk")

# Flags set once after parsing; contextvars rather than module globals so the
# Python API can run nested or concurrent calls with different settings.
DEBUG: contextvars.ContextVar[bool] = contextvars.ContextVar("DEBUG", default=False)

_COLOURS = {
    logging.DEBUG: "\033[2m",
    logging.WARNING: "\033[33m",
    logging.ERROR: "\033[31;1m",
}
_RESET = "\033[0m"


def use_colour(stream: TextIO) -> bool:
    return "NO_COLOR" not in os.environ and stream.isatty() and os.environ.get("TERM") != "dumb"


class TextFormatter(logging.Formatter):
    def __init__(self, colour: bool) -> None:
        super().__init__()
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            prefix = "error: "
        elif record.levelno >= logging.WARNING:
            prefix = "warning: "
        else:
            prefix = ""
        line = prefix + message
        if record.exc_info and DEBUG.get():
            line += "\n" + self.formatException(record.exc_info)
        if self.colour and record.levelno in _COLOURS:
            line = _COLOURS[record.levelno] + line + _RESET
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        return json.dumps(entry, sort_keys=True)


def setup(debug: bool = False, log_format: str = "text", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    DEBUG.set(debug)
    handler = logging.StreamHandler(stream)
    formatter: logging.Formatter = (
        JsonFormatter() if log_format == "json" else TextFormatter(use_colour(stream))
    )
    handler.setFormatter(formatter)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """Log a phase, then how long it took (at debug level, info with --debug)."""
    logger.info("%s…", what)
    start = time.monotonic()
    yield
    logger.debug("%s took %.2fs", what, time.monotonic() - start)


_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|[\x00-\x08\x0b-\x1f\x7f]")


def console_tail(path: Path, lines: int = 15) -> list[str]:
    """The last LINES non-blank lines of a serial console log, without escape codes."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read().decode(errors="replace")
    except OSError:
        return []
    cleaned = [_ANSI_RE.sub("", line).strip() for line in data.replace("\r", "\n").split("\n")]
    return [line for line in cleaned if line][-lines:]


def file_tail(path: Path, lines: int = 10) -> list[str]:
    """The last LINES non-blank lines of a text file ([] if it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]
