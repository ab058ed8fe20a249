"""Options of ephemeral VMs: parsing and validating what users type.

Every value from the CLI or the Python API passes through ``make_options``,
which raises ``UsageError`` (one line plus a hint) for anything invalid, so
nothing below this layer sees unchecked input.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bcvk.ephemeral import registry as state
from bcvk.errors import BcvkError, UsageError
from bcvk.host import podman
from bcvk.host.qemu import PortForward
from bcvk.values import INSTANCE_TYPES, MIB, parse_size

DEFAULT_MEMORY = "2G"
DEFAULT_SSH_TIMEOUT = 240.0
MIN_MEMORY_MIB = 128
MAX_MEMORY_MIB = 1024 * 1024  # 1 TiB
MAX_VCPUS = 256
ROOTFS_CHOICES = ("auto", "virtiofs", "block")
PULL_CHOICES = ("missing", "always", "never")

ITYPES = INSTANCE_TYPES

_SHARE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,30}$")
_SERIAL_RE = re.compile(r"^[A-Za-z0-9_-]{1,20}$")


def default_vcpus() -> int:
    return max(1, min(os.cpu_count() or 2, 4))


# ---------------------------------------------------------------- options


@dataclass(frozen=True)
class Bind:
    host: Path
    name: str
    readonly: bool

    @property
    def tag(self) -> str:
        return f"mount_{self.name}"

    @property
    def guest_path(self) -> str:
        return f"/run/virtiofs-mnt-{self.name}"


@dataclass(frozen=True)
class DiskFile:
    path: Path
    name: str
    format: str


@dataclass(frozen=True)
class LogDir:
    directory: Path
    console: bool = True
    journal: bool = True


@dataclass(frozen=True)
class Options:
    """Everything `ephemeral run` accepts, validated (see ``make_options``)."""

    image: str
    name: str | None = None
    memory_mib: int = 2048
    vcpus: int = field(default_factory=default_vcpus)
    kargs: tuple[str, ...] = ()
    detach: bool = False
    console: bool = False
    log_dir: LogDir | None = None
    execute: tuple[str, ...] = ()
    binds: tuple[Bind, ...] = ()
    disks: tuple[DiskFile, ...] = ()
    ports: tuple[PortForward, ...] = ()
    add_swap: int | None = None
    virtiofsd: str | None = None
    pull: str = "missing"
    ssh_timeout: float = DEFAULT_SSH_TIMEOUT
    accel: str | None = None
    rootfs: str = "auto"
    progress: bool | None = None  # None: when stderr is a terminal


def parse_memory(text: str | int) -> int:
    """``--memory``: ``2G``, ``1024M``, ``1024`` (MiB) → MiB."""
    if isinstance(text, int):
        mib = text
    else:
        mib = parse_size(str(text), default_unit="m", what="--memory") // MIB
    if not MIN_MEMORY_MIB <= mib <= MAX_MEMORY_MIB:
        raise UsageError(
            f"invalid --memory {text!r}: must be between {MIN_MEMORY_MIB} MiB and 1 TiB",
            hint="e.g. --memory 2G or --memory 4096 (MiB)",
        )
    return mib


def parse_vcpus(text: str | int) -> int:
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise UsageError(f"invalid --vcpus {text!r}", hint="a whole number, e.g. 2") from None
    if not 1 <= n <= MAX_VCPUS:
        raise UsageError(f"invalid --vcpus {text!r}: must be between 1 and {MAX_VCPUS}")
    return n


def parse_itype(text: str) -> tuple[int, int]:
    if text not in ITYPES:
        raise UsageError(f"unknown instance type {text!r}", hint="one of: " + ", ".join(ITYPES))
    return ITYPES[text]


def _port(text: str, what: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise UsageError(f"invalid {what} {text!r}", hint="ports are numbers from 1 to 65535")
    return int(text)


def parse_port(text: str) -> PortForward:
    """``-p HOST:GUEST`` (always bound on 127.0.0.1)."""
    parts = text.split(":")
    if len(parts) != 2:
        raise UsageError(
            f"invalid --port {text!r}", hint="use HOST_PORT:GUEST_PORT, e.g. -p 8080:80"
        )
    return PortForward(_port(parts[0], "host port"), _port(parts[1], "guest port"))


def parse_bind(text: str, *, readonly: bool) -> Bind:
    """``--bind HOST[:NAME]``; NAME defaults to the directory's base name."""
    flag = "--ro-bind" if readonly else "--bind"
    host, _, name = text.partition(":")
    if not host:
        raise UsageError(f"invalid {flag} {text!r}", hint=f"use {flag} /host/dir[:NAME]")
    path = Path(host).expanduser()
    name = name or path.resolve().name
    if not _SHARE_NAME_RE.match(name):
        raise UsageError(
            f"invalid share name {name!r} in {flag} {text!r}",
            hint="names are 1-30 letters, digits, '_', '.', '-'; pick one with HOST:NAME",
        )
    if not path.is_dir():
        raise UsageError(f"{flag} {host}: no such directory")
    return Bind(path.resolve(), name, readonly)


def parse_disk(text: str) -> DiskFile:
    """``--mount-disk-file FILE[:NAME[:FMT]]``."""
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise UsageError(f"invalid --mount-disk-file {text!r}", hint="use FILE[:NAME[:raw|qcow2]]")
    path = Path(parts[0]).expanduser()
    name = parts[1] if len(parts) > 1 and parts[1] else "output"
    fmt = parts[2] if len(parts) > 2 else ("qcow2" if path.suffix == ".qcow2" else "raw")
    if not _SERIAL_RE.match(name):
        raise UsageError(
            f"invalid disk name {name!r}",
            hint="1-20 letters, digits, '_' or '-' (it becomes /dev/disk/by-id/virtio-NAME)",
        )
    if fmt not in ("raw", "qcow2"):
        raise UsageError(f"invalid disk format {fmt!r}", hint="raw or qcow2")
    if path.exists() and not path.is_file():
        raise UsageError(f"--mount-disk-file {path}: not a regular file")
    if not path.exists() and not path.parent.is_dir():
        raise UsageError(f"--mount-disk-file {path}: directory {path.parent} does not exist")
    return DiskFile(path.absolute(), name, fmt)


def parse_karg(text: str) -> str:
    if not text or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise UsageError(
            f"invalid --karg {text!r}",
            hint="kernel arguments are one line without control characters",
        )
    return text


def parse_log_dir(text: str) -> LogDir:
    """``DIR`` (every stream) or upstream's ``STREAMS=DIR`` (``console,journal=DIR``)."""
    streams, sep, directory = text.rpartition("=")
    if not sep:
        streams, directory = "console,journal", text
    names = {s.strip() for s in streams.split(",") if s.strip()}
    unknown = names - {"console", "journal"}
    if unknown or not names or not directory:
        raise UsageError(
            f"invalid --log-dir {text!r}",
            hint="use DIR or console=DIR, journal=DIR, console,journal=DIR",
        )
    return LogDir(Path(directory).expanduser().absolute(), "console" in names, "journal" in names)


def parse_timeout(value: float | str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(f"invalid --ssh-timeout {value!r}", hint="seconds, e.g. 240") from None
    if seconds <= 0:
        raise UsageError(f"invalid --ssh-timeout {value!r}: must be positive")
    return seconds


def make_options(
    image: str,
    *,
    name: str | None = None,
    memory: str | int | None = None,
    vcpus: str | int | None = None,
    itype: str | None = None,
    kargs: Sequence[str] = (),
    detach: bool = False,
    console: bool = False,
    log_dir: str | None = None,
    execute: Sequence[str] = (),
    binds: Sequence[str] = (),
    ro_binds: Sequence[str] = (),
    disks: Sequence[str] = (),
    ports: Sequence[str] = (),
    add_swap: str | None = None,
    virtiofsd: str | None = None,
    pull: str = "missing",
    ssh_timeout: float | str = DEFAULT_SSH_TIMEOUT,
    accel: str | None = None,
    rootfs: str = "auto",
    progress: bool | None = None,
) -> Options:
    """Validate raw (CLI-shaped) values into ``Options``; raises UsageError."""
    podman.validate_reference(image)
    if name is not None:
        state.validate_name(name)
    mem = parse_memory(memory if memory is not None else DEFAULT_MEMORY)
    cpus = parse_vcpus(vcpus) if vcpus is not None else default_vcpus()
    if itype is not None:
        cpus, mem = parse_itype(itype)
    if rootfs not in ROOTFS_CHOICES:
        raise UsageError(f"invalid --rootfs {rootfs!r}", hint="auto, virtiofs or block")
    if pull not in PULL_CHOICES:
        raise UsageError(f"invalid --pull {pull!r}", hint="missing, always or never")
    if accel is not None and accel not in ("kvm", "tcg"):
        raise UsageError(f"invalid --accel {accel!r}", hint="kvm or tcg")
    all_binds = tuple(parse_bind(b, readonly=False) for b in binds) + tuple(
        parse_bind(b, readonly=True) for b in ro_binds
    )
    names = [b.name for b in all_binds]
    if len(set(names)) != len(names):
        raise UsageError("two --bind/--ro-bind shares have the same name", hint="use HOST:NAME")
    disk_files = tuple(parse_disk(d) for d in disks)
    serials = [d.name for d in disk_files]
    if len(set(serials)) != len(serials) or {"swap", "bcvk-rootfs"} & set(serials):
        raise UsageError("--mount-disk-file names must be unique and not swap/bcvk-rootfs")
    forwards = tuple(parse_port(p) for p in ports)
    hosts = [f.host_port for f in forwards]
    if len(set(hosts)) != len(hosts):
        raise UsageError("the same host port is forwarded twice")
    swap = parse_size(add_swap, what="--add-swap") if add_swap else None
    if swap is not None and swap < 40960:
        raise UsageError(f"--add-swap {add_swap}: too small", hint="e.g. --add-swap 1G")
    if detach and (console or execute):
        raise UsageError("--detach cannot be combined with --console or --execute")
    return Options(
        image=image,
        name=name,
        memory_mib=mem,
        vcpus=cpus,
        kargs=tuple(parse_karg(k) for k in kargs),
        detach=detach,
        console=console,
        log_dir=parse_log_dir(log_dir) if log_dir else None,
        execute=tuple(execute),
        binds=all_binds,
        disks=disk_files,
        ports=forwards,
        add_swap=swap,
        virtiofsd=virtiofsd,
        pull=pull,
        ssh_timeout=parse_timeout(ssh_timeout),
        accel=accel,
        rootfs=rootfs,
        progress=progress,
    )


def check_ports_free(forwards: Sequence[PortForward]) -> None:
    for fwd in forwards:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", fwd.host_port))
            except OSError as exc:
                raise BcvkError(
                    f"host port {fwd.host_port} is not available: {exc.strerror}",
                    hint="pick another HOST port for -p HOST:GUEST",
                ) from None


def free_port(avoid: set[int]) -> int:
    """A free TCP port on 127.0.0.1 that no other VM of ours has claimed."""
    for _ in range(64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port
    raise BcvkError("could not find a free TCP port on 127.0.0.1")


def new_name() -> str:
    return f"bcvk-{secrets.token_hex(4)}"


# ssh options that take a value (from ssh(1)).
_SSH_VALUE_OPTS = set("BbcDEeFIiJLlmOoPpQRSWw")


def split_ssh_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Leading ``-x``/``-o VALUE`` words are ssh options; the rest is the command."""
    options: list[str] = []
    words = list(args)
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            return options, words[i + 1 :]
        if not word.startswith("-") or word == "-":
            break
        options.append(word)
        if len(word) == 2 and word[1] in _SSH_VALUE_OPTS:
            if i + 1 >= len(words):
                raise UsageError(f"ssh option {word} needs a value")
            options.append(words[i + 1])
            i += 1
        i += 1
    return options, words[i:]
