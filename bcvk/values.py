"""The typed values every command shares, each parsed from user text in one place.

Sizes, memory and vCPU counts, instance types, port forwards, firmware,
accelerators, pull policies, timeouts, VM names and labels: the CLI, the
Python API and (later) configuration files all turn text into these objects
through the functions here, so that two commands can never disagree about
what ``-p 8080:80`` or ``--memory 2G`` means.  Every parser raises
``UsageError`` (one line plus a hint) and nothing else.
"""

from __future__ import annotations

import enum
import math
import os
import re
from dataclasses import dataclass
from typing import TypeVar

from bcvk.errors import UsageError

KIB = 1024
MIB = 1024**2
GIB = 1024**3
TIB = 1024**4
# Nothing bcvk makes (a disk, a swap file, guest RAM) is bigger than this;
# anything larger is a typo, and bounding it keeps arithmetic honest.
MAX_SIZE = 1024 * TIB

_UNITS = {"": 1, "b": 1, "k": KIB, "m": MIB, "g": GIB, "t": TIB}
_SIZE_RE = re.compile(r"\s*(\d{1,20})(?:\.(\d{1,9}))?\s*([kmgtb]?)(?:i?b)?\s*", re.IGNORECASE)


_SIZE_HINT = "use a number with an optional unit, e.g. 512M, 4G, 20GiB"


def parse_size(text: str, *, default_unit: str = "", what: str = "size") -> int:
    """Parse ``4G``, ``512M``, ``2GiB``, ``1.5g`` or bare numbers into bytes.

    Units are powers of 1024 whatever the spelling, as upstream treats them.
    A bare number is in ``default_unit`` (MiB for --memory, bytes otherwise).
    """
    match = _SIZE_RE.fullmatch(text)
    if not match:
        raise UsageError(f"invalid {what} {text!r}", hint=_SIZE_HINT)
    whole, fraction, unit = match.groups()
    scale = _UNITS[(unit or default_unit).lower()]
    # Integers only: a float of a 20-digit number loses digits or overflows.
    value = int(whole) * scale
    if fraction:
        value += int(fraction) * scale // 10 ** len(fraction)
    if value <= 0:
        raise UsageError(f"invalid {what} {text!r}: must be positive", hint=_SIZE_HINT)
    if value > MAX_SIZE:
        raise UsageError(
            f"invalid {what} {text!r}: larger than {format_size(MAX_SIZE)}", hint=_SIZE_HINT
        )
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


# ---------------------------------------------------------------- machine size

MIN_MEMORY_MIB = 128
MAX_MEMORY_MIB = 1024 * 1024  # 1 TiB
MAX_VCPUS = 256

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


def parse_memory(text: str | int, what: str = "--memory") -> int:
    """``2G``, ``1024M``, ``1024`` (MiB) → MiB, within 128 MiB … 1 TiB."""
    if isinstance(text, int):
        mib = text
    else:
        mib = parse_size(str(text), default_unit="m", what=what) // MIB
    if not MIN_MEMORY_MIB <= mib <= MAX_MEMORY_MIB:
        raise UsageError(
            f"invalid {what} {text!r}: must be between {MIN_MEMORY_MIB} MiB and 1 TiB",
            hint=f"e.g. {what} 2G or {what} 4096 (MiB)",
        )
    return mib


def parse_vcpus(text: str | int, what: str = "--vcpus") -> int:
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise UsageError(f"invalid {what} {text!r}", hint="a whole number, e.g. 2") from None
    if not 1 <= n <= MAX_VCPUS:
        raise UsageError(
            f"invalid {what} {text!r}: must be between 1 and {MAX_VCPUS}",
            hint="a whole number of vCPUs, e.g. 2 (at most the host's CPUs is usual)",
        )
    return n


def parse_itype(text: str) -> tuple[int, int]:
    """An instance type → (vCPUs, MiB)."""
    if text not in INSTANCE_TYPES:
        raise UsageError(
            f"unknown instance type {text!r}", hint="one of: " + ", ".join(INSTANCE_TYPES)
        )
    return INSTANCE_TYPES[text]


def default_vcpus(cap: int = 4) -> int:
    return max(1, min(os.cpu_count() or 2, cap))


# ---------------------------------------------------------------- network


@dataclass(frozen=True)
class PortForward:
    """``-p HOST:GUEST``: 127.0.0.1:HOST on the host reaches GUEST in the guest."""

    host: int
    guest: int

    def __str__(self) -> str:
        return f"{self.host}:{self.guest}"

    @classmethod
    def parse(cls, text: str) -> PortForward:
        parts = text.split(":")
        if len(parts) != 2:
            raise UsageError(
                f"invalid port forward {text!r}: expected HOST:GUEST",
                hint="give both ports, e.g. -p 8080:80 (as upstream bcvk, one number is refused)",
            )
        return cls(_port(parts[0], text), _port(parts[1], text))


def _port(word: str, text: str) -> int:
    if not word.isascii() or not word.isdigit() or not 1 <= int(word) <= 65535:
        raise UsageError(
            f"invalid port forward {text!r}: {word!r} is not a port",
            hint="ports are numbers from 1 to 65535, e.g. -p 8080:80",
        )
    return int(word)


def unique_host_ports(forwards: tuple[PortForward, ...]) -> tuple[PortForward, ...]:
    hosts = [f.host for f in forwards]
    if len(set(hosts)) != len(hosts):
        raise UsageError("the same host port is forwarded twice", hint="use one -p per host port")
    return forwards


# ---------------------------------------------------------------- choices


class Firmware(enum.StrEnum):
    """How a machine boots; disks say which of these they support."""

    uefi = "uefi"  # OVMF without secure boot (upstream: uefi-insecure)
    uefi_secure = "uefi-secure"
    bios = "bios"
    both = "both"  # a disk bootable by either (bootc installer only)

    @property
    def is_uefi(self) -> bool:
        return self is not Firmware.bios


class Network(enum.StrEnum):
    """A VM's network: QEMU user-mode networking (NAT, forwards on 127.0.0.1) or none."""

    user = "user"
    none = "none"


class Accel(enum.StrEnum):
    kvm = "kvm"
    tcg = "tcg"


class PullPolicy(enum.StrEnum):
    missing = "missing"
    always = "always"
    never = "never"


class OutputFormat(enum.StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


E = TypeVar("E", bound=enum.StrEnum)


def parse_choice(kind: type[E], value: object, what: str) -> E:
    """VALUE as a member of the enum KIND, or a usage error listing the choices."""
    try:
        return kind(str(value))
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise UsageError(f"invalid {what} {value!r}", hint=f"choose one of: {choices}") from None


# ---------------------------------------------------------------- time

MAX_TIMEOUT = 7 * 24 * 3600.0


def parse_timeout(value: float | str, what: str = "--ssh-timeout") -> float:
    """Seconds: finite, positive, at most a week (``nan`` would wait forever)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"invalid {what} {value!r}", hint="seconds, e.g. 240") from None
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT:
        raise UsageError(
            f"invalid {what} {value!r}: must be between 0 and a week, in seconds",
            hint="seconds, e.g. 240; a slow host may need 900",
        )
    return seconds


# ---------------------------------------------------------------- guest


def parse_karg(text: str) -> str:
    """A kernel argument: one line without control characters."""
    if not text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise UsageError(
            f"invalid kernel argument {text!r}",
            hint="kernel arguments are one line without control characters",
        )
    return text


# ---------------------------------------------------------------- names

# A VM name is also a directory, a libvirt domain and part of file names.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# Not starting with "-": a label may be handed to a program as an argument.
_LABEL_RE = re.compile(r"[A-Za-z0-9_.:/=@+][A-Za-z0-9_.:/=@+-]{0,127}")
# A login name as useradd takes it: what ssh(1) is given, never an option.
_USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")


def _matching(pattern: re.Pattern[str], text: str, what: str, hint: str) -> str:
    # fullmatch: `$` would accept a trailing newline.
    if not pattern.fullmatch(text):
        raise UsageError(f"invalid {what} {text!r}", hint=hint)
    return text


def is_vm_name(name: str) -> bool:
    return _NAME_RE.fullmatch(name) is not None


def validate_vm_name(name: str) -> str:
    hint = "use 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit"
    return _matching(_NAME_RE, name, "VM name", hint)


def validate_user(user: str) -> str:
    hint = "a login name: lowercase letters, digits, '_', '.', '-', not starting with '-'"
    return _matching(_USER_RE, user, "user name", hint)


def validate_label(label: str) -> str:
    """A label (``KEY`` or ``KEY=VALUE``): printable, no commas or blanks."""
    hint = (
        "labels are 1-128 letters, digits and _ . : / = @ + -,"
        " not starting with '-'; no commas or spaces"
    )
    return _matching(_LABEL_RE, label, "label", hint)
