"""Rendering of data on stdout: tables for people, JSON/YAML for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from bcvk.log import use_colour

F = TypeVar("F", bound=Callable[..., Any])


class Listed(Protocol):
    def to_json(self) -> Any: ...


L = TypeVar("L", bound=Listed)


def emit_listing(fmt: str, items: Sequence[L], headers: Sequence[str],
                 row: Callable[[L], Sequence[object]]) -> None:  # fmt: skip
    """ITEMS as JSON (each one's ``to_json``) when FMT says so, else as a table."""
    if fmt == "json":
        emit_json([item.to_json() for item in items])
    else:
        emit_table(headers, [row(item) for item in items])


def emit_data(fmt: str, data: Any) -> None:
    """DATA as JSON when FMT says so, else YAML."""
    if fmt == "json":
        emit_json(data)
    else:
        emit_yaml(data)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def emit_yaml(data: Any) -> None:
    import yaml

    sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def emit_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    import io

    from rich.console import Console
    from rich.table import Table

    tty = sys.stdout.isatty()
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        force_terminal=tty,
        no_color=not use_colour(sys.stdout),
        highlight=False,
        # Off a TTY rich assumes 80 columns and would wrap cells; scripts that
        # `grep` a table want one line per row.
        width=None if tty else 10_000,
        soft_wrap=not tty,
    )
    table = Table(box=None, pad_edge=False, header_style="bold" if tty else "")
    for header in headers:
        table.add_column(header, no_wrap=True)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)
    # Cells are padded to the column width; trailing blanks only hurt grep.
    sys.stdout.write("".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines()))


def emit_pairs(pairs: Sequence[tuple[str, object]]) -> None:
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        sys.stdout.write(f"{key + ':':<{width + 1}} {value}\n")


def age(timestamp: str | int | float, now: datetime | None = None) -> str:
    """``3 hours ago`` from a unix time or an RFC 3339 string."""
    now = now or datetime.now(UTC)
    try:
        if isinstance(timestamp, int | float) or str(timestamp).isdigit():
            then = datetime.fromtimestamp(float(timestamp), UTC)
        else:
            text = str(timestamp).replace("Z", "+00:00")
            # podman prints nanoseconds; datetime takes at most microseconds
            if "." in text:
                head, frac = text.split(".", 1)
                digits = "".join(c for c in frac if c.isdigit())
                rest = frac[len(digits) :]
                text = f"{head}.{digits[:6]}{rest}"
            then = datetime.fromisoformat(text)
        if then.tzinfo is None:
            then = then.replace(tzinfo=UTC)
    except (ValueError, OSError):
        return str(timestamp)
    seconds = int((now - then).total_seconds())
    for unit, size in (
        ("year", 31536000),
        ("month", 2592000),
        ("week", 604800),
        ("day", 86400),
        ("hour", 3600),
        ("minute", 60),
    ):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now" if seconds < 5 else f"{seconds} seconds ago"
