"""Options of ephemeral VMs: the typed ``Options``, and parsing what users type into it.

Every value from the CLI or the Python API passes through ``make_options``,
which raises ``UsageError`` (one line plus a hint) for anything invalid, so
nothing below this layer sees unchecked input.  The shared values (sizes,
ports, names, shares) are parsed by ``bcvk.values`` and ``bcvk.guest.mounts``,
as for every other command.
"""

from __future__ import annotations

import enum
import os
import re
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bcvk import paths
from bcvk.errors import BcvkError, UsageError, os_hint
from bcvk.guest import cloudinit, mounts, stall
from bcvk.guest.initrd import Member, units_members
from bcvk.guest.logdir import LogDir, parse_log_dir
from bcvk.guest.mounts import Share
from bcvk.host import podman
from bcvk.values import (
    Accel,
    PortForward,
    PullPolicy,
    default_vcpus,
    parse_choice,
    parse_itype,
    parse_karg,
    parse_memory,
    parse_size,
    parse_timeout,
    parse_vcpus,
    unique_host_ports,
    validate_label,
    validate_vm_name,
)

DEFAULT_MEMORY_MIB = 2048
DEFAULT_SSH_TIMEOUT = 240.0
MIN_SWAP = 40960  # mkswap's minimum

_SERIAL_RE = re.compile(r"[A-Za-z0-9_-]{1,20}")


class RootfsMode(enum.StrEnum):
    """How the image's root filesystem reaches the guest."""

    auto = "auto"  # virtiofs when a virtiofsd is found, else block
    virtiofs = "virtiofs"
    block = "block"


class WarmMode(enum.StrEnum):
    """Whether a VM may start from a saved, booted machine (``bcvk.ephemeral.warm``)."""

    auto = "auto"  # restore a snapshot when one exists; else boot cold and save one
    off = "off"  # always boot cold, save nothing
    refresh = "refresh"  # drop the snapshot, boot cold, save a new one


WARM_ENV = "BCVK_WARM"


@dataclass(frozen=True)
class DiskFile:
    """``--mount-disk-file``: FILE as /dev/disk/by-id/virtio-NAME (created if missing)."""

    path: Path
    name: str
    format: str  # "raw" or "qcow2"


@dataclass(frozen=True)
class Options:
    """Everything `ephemeral run` accepts, validated (see ``make_options``)."""

    image: str
    name: str | None = None
    memory_mib: int = DEFAULT_MEMORY_MIB
    vcpus: int = field(default_factory=default_vcpus)
    kargs: tuple[str, ...] = ()
    detach: bool = False
    console: bool = False
    log_dir: LogDir | None = None
    execute: tuple[str, ...] = ()
    # --systemd-units: the directory's units, read and checked (bcvk.guest.initrd)
    systemd_units: tuple[Member, ...] = ()
    binds: tuple[Share, ...] = ()
    disks: tuple[DiskFile, ...] = ()
    ports: tuple[PortForward, ...] = ()
    network_isolation: bool = False
    bind_storage_ro: bool = False  # the host's store is one of binds; see boot.guest_setup
    # --cloud-init / --cloud-init-empty: the seed's files, (name, content)
    cloud_init: tuple[tuple[str, str], ...] = ()
    labels: tuple[str, ...] = ()  # KEY or KEY=VALUE, as `ps --label` matches them
    add_swap: int | None = None
    virtiofsd: str | None = None
    pull: PullPolicy = PullPolicy.missing
    ssh_timeout: float = DEFAULT_SSH_TIMEOUT
    accel: Accel | None = None
    rootfs: RootfsMode = RootfsMode.auto
    progress: bool | None = None  # None: when stderr is a terminal
    warm: WarmMode = WarmMode.auto
    # $BCVK_BOOT_STALL_TIMEOUT: a kernel silent this long before init is booted again (0: never)
    boot_stall: float = field(default_factory=stall.limit)
    # `bcvk up`: the bcvk.toml this VM was started from, as JSON (file, vm,
    # settings); kept in its record so `down` stops only the file's own VMs.
    project: str = ""


def parse_disk(text: str) -> DiskFile:
    """``--mount-disk-file FILE[:NAME[:FMT]]``."""
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise UsageError(f"invalid --mount-disk-file {text!r}", hint="use FILE[:NAME[:raw|qcow2]]")
    path = paths.user_path(parts[0], "--mount-disk-file")
    name = parts[1] if len(parts) > 1 and parts[1] else "output"
    fmt = parts[2] if len(parts) > 2 else ("qcow2" if path.suffix == ".qcow2" else "raw")
    if not _SERIAL_RE.fullmatch(name):
        raise UsageError(
            f"invalid disk name {name!r}",
            hint="1-20 letters, digits, '_' or '-' (it becomes /dev/disk/by-id/virtio-NAME)",
        )
    if fmt not in ("raw", "qcow2"):
        raise UsageError(f"invalid disk format {fmt!r}", hint="raw or qcow2")
    try:
        if path.exists() and not path.is_file():
            raise UsageError(
                f"--mount-disk-file {path}: not a regular file", hint="give a disk image file"
            )
        if not path.exists() and not path.parent.is_dir():
            raise UsageError(
                f"--mount-disk-file {path}: directory {path.parent} does not exist",
                hint="create the directory first; bcvk creates only the file",
            )
    except OSError as exc:  # ENAMETOOLONG, EACCES: Python 3.11 raises them
        raise UsageError(f"--mount-disk-file {text!r}: {exc.strerror}", hint=os_hint(exc)) from None
    return DiskFile(path.absolute(), name, fmt)


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
    systemd_units: str | None = None,
    binds: Sequence[str] = (),
    ro_binds: Sequence[str] = (),
    disks: Sequence[str] = (),
    ports: Sequence[str] = (),
    network_isolation: bool = False,
    bind_storage_ro: bool = False,
    cloud_init: str | None = None,
    cloud_init_empty: bool = False,
    labels: Sequence[str] = (),
    add_swap: str | None = None,
    virtiofsd: str | None = None,
    pull: str = "missing",
    ssh_timeout: float | str = DEFAULT_SSH_TIMEOUT,
    accel: str | None = None,
    rootfs: str = "auto",
    progress: bool | None = None,
    warm: str | None = None,
) -> Options:
    """Validate raw (CLI-shaped) values into ``Options``; raises UsageError."""
    podman.validate_reference(image)
    if name is not None:
        validate_vm_name(name)
    mem = parse_memory(memory) if memory is not None else DEFAULT_MEMORY_MIB
    cpus = parse_vcpus(vcpus) if vcpus is not None else default_vcpus()
    if itype is not None:
        cpus, mem = parse_itype(itype)
    shares = tuple(mounts.parse_named(b, readonly=False) for b in binds) + tuple(
        mounts.parse_named(b, readonly=True) for b in ro_binds
    )
    if bind_storage_ro:
        shares += (_host_storage(),)
    tags = [s.tag for s in shares]
    if len(set(tags)) != len(tags):
        raise UsageError("two --bind/--ro-bind shares have the same name", hint="use HOST:NAME")
    disk_files = tuple(parse_disk(d) for d in disks)
    serials = [d.name for d in disk_files]
    if len(set(serials)) != len(serials) or {"swap", "bcvk-rootfs"} & set(serials):
        raise UsageError(
            "--mount-disk-file names must be unique and not swap/bcvk-rootfs",
            hint="give each disk its own name: FILE:NAME",
        )
    swap = parse_size(add_swap, what="--add-swap") if add_swap else None
    if swap is not None and swap < MIN_SWAP:
        raise UsageError(f"--add-swap {add_swap}: too small", hint="e.g. --add-swap 1G")
    if detach and (console or execute):
        raise UsageError(
            "--detach cannot be combined with --console or --execute",
            hint="a detached VM has no console here; `ephemeral ssh NAME CMD` runs commands in it",
        )
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
        systemd_units=(
            units_members(paths.user_path(systemd_units, "--systemd-units"))
            if systemd_units
            else ()
        ),
        binds=shares,
        disks=disk_files,
        ports=unique_host_ports(tuple(PortForward.parse(p) for p in ports)),
        network_isolation=network_isolation,
        bind_storage_ro=bind_storage_ro,
        cloud_init=_cloud_init(cloud_init, cloud_init_empty),
        labels=tuple(validate_label(label) for label in labels),
        add_swap=swap,
        virtiofsd=virtiofsd,
        pull=parse_choice(PullPolicy, pull, "--pull"),
        ssh_timeout=parse_timeout(ssh_timeout),
        accel=parse_choice(Accel, accel, "--accel") if accel is not None else None,
        rootfs=parse_choice(RootfsMode, rootfs, "--rootfs"),
        progress=progress,
        warm=parse_warm(warm),
    )


def _host_storage() -> Share:
    try:
        root = podman.graph_root()
    except BcvkError as exc:
        raise UsageError(
            f"--bind-storage-ro: podman cannot say where its storage is: {exc}",
            hint="check that `podman info` works for this user",
        ) from None
    if not root.is_dir():
        raise UsageError(
            f"--bind-storage-ro: this user's container storage {root} does not exist",
            hint="pull or build an image first (`podman images` creates the store)",
        )
    return mounts.host_storage(root)


def _cloud_init(path: str | None, empty: bool) -> tuple[tuple[str, str], ...]:
    if path is not None and empty:
        raise UsageError(
            "--cloud-init and --cloud-init-empty cannot be combined",
            hint="--cloud-init-empty gives cloud-init an empty seed; pick one",
        )
    if empty:
        return (("user-data", cloudinit.EMPTY_USER_DATA),)
    return cloudinit.read_seed(path) if path is not None else ()


def parse_warm(text: str | None) -> WarmMode:
    """``--warm``, else ``$BCVK_WARM``, else auto."""
    if text is not None:
        return parse_choice(WarmMode, text, "--warm")
    env = os.environ.get(WARM_ENV)
    return parse_choice(WarmMode, env, WARM_ENV) if env else WarmMode.auto


def check_ports_free(forwards: Sequence[PortForward]) -> None:
    for fwd in forwards:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", fwd.host))
            except OSError as exc:
                raise BcvkError(
                    f"host port {fwd.host} is not available: {exc.strerror}",
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
    raise BcvkError(
        "could not find a free TCP port on 127.0.0.1",
        hint="free some ports, or pass -p with a port you know is free",
    )


def new_name() -> str:
    return f"bcvk-{secrets.token_hex(4)}"
