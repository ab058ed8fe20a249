"""Shared value types and parsers for sizes and other user input."""

from __future__ import annotations

import enum
import re

from bcvk.errors import UsageError

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4

_UNITS = {"": 1, "b": 1, "k": KIB, "m": MIB, "g": GIB, "t": TIB}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtb]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str, *, default_unit: str = "", what: str = "size") -> int:
    """Parse ``4G``, ``512M``, ``2GiB``, ``1.5g`` or bare numbers into bytes.

    Units are powers of 1024 whatever the spelling, as upstream treats them.
    A bare number is in ``default_unit`` (MiB for --memory, bytes otherwise).
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise UsageError(
            f"invalid {what} {text!r}",
            hint="use a number with an optional unit, e.g. 512M, 4G, 20GiB",
        )
    number, unit = match.groups()
    unit = (unit or default_unit).lower()
    value = int(float(number) * _UNITS[unit])
    if value <= 0:
        raise UsageError(f"invalid {what} {text!r}: must be positive")
    return value


def format_size(n: int) -> str:
    """Human size in binary units, like podman's (``1.2 GiB``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# KubeVirt U-series instance types (upstream bcvk's --itype): vCPUs, MiB.
INSTANCE_TYPES: dict[str, tuple[int, int]] = {
    "u1.nano": (1, 512),
    "u1.micro": (1, 1024),
    "u1.small": (1, 2048),
    "u1.medium": (1, 4096),
    "u1.2xmedium": (2, 4096),
    "u1.large": (2, 8192),
    "u1.xlarge": (4, 16384),
    "u1.2xlarge": (8, 32768),
    "u1.4xlarge": (16, 65536),
    "u1.8xlarge": (32, 131072),
}


class OutputFormat(enum.StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"
