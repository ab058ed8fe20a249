"""Starting the processes of an ephemeral VM: virtiofsd(s) and QEMU.

``Plan`` gathers what one launch needs (image, cache entry, transport,
state directory); ``launch`` starts the children concurrently.  Everything a
child is recorded in the VM's state as soon as it exists, so a bcvk killed at
any point leaves a record the next command can reap.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bcvk import run
from bcvk.ephemeral import cache as rootfs
from bcvk.ephemeral import registry as state
from bcvk.ephemeral.options import DiskFile, Options
from bcvk.errors import BcvkError, ToolMissingError, WaitTimeout
from bcvk.host import podman, qemu, qmp, virtiofsd
from bcvk.host.qemu import Accel, RootfsKind
from bcvk.image import inspect as images
from bcvk.image.tree import TreeFacts
from bcvk.log import logger
from bcvk.values import GIB, MIB

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|[\x00-\x08\x0b-\x1f\x7f]")


def console_tail(path: Path, lines: int = 15) -> list[str]:
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
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


@dataclass
class Plan:
    """What one launch needs, gathered before any process starts."""

    opts: Options
    info: podman.ImageInfo
    vmdir: state.VmDir
    record: state.VmRecord
    prepared: rootfs.Prepared | None = None
    kind: RootfsKind = RootfsKind.block
    virtiofsd: Path | None = None
    mount_path: Path | None = None
    listeners: list[socket.socket] = field(default_factory=list)
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)
    qemu_binary: str = ""


def qemu_binary() -> str:
    explicit = os.environ.get("QEMU_BIN")
    if explicit:
        return explicit
    arch = os.uname().machine
    return os.fspath(run.require(f"qemu-system-{arch}", "/usr/libexec/qemu-kvm", why="to run VMs"))


def choose_rootfs(opts: Options, facts: TreeFacts | None) -> tuple[RootfsKind, Path | None]:
    """The rootfs transport and the virtiofsd to use (for binds too), if any."""
    binary = virtiofsd.find(opts.virtiofsd)  # raises if an explicit path is bad
    if opts.rootfs == "virtiofs":
        if binary is None:
            raise ToolMissingError("--rootfs virtiofs: virtiofsd not found", hint=virtiofsd.HINT)
        return RootfsKind.virtiofs, binary
    if opts.rootfs == "block":
        return RootfsKind.block, binary
    caps = facts.initramfs if facts else {}
    if binary is None:
        logger.info(
            "virtiofsd not found; using --rootfs block (a read-only ext4 copy of the "
            "image, built once and cached)"
        )
        return RootfsKind.block, None
    if caps and not caps.get("virtiofs") and caps.get("virtio_blk") and caps.get("ext4"):
        logger.info("the image's initramfs cannot mount virtiofs; using --rootfs block")
        return RootfsKind.block, binary
    return RootfsKind.virtiofs, binary


def judge(plan: Plan, facts: TreeFacts) -> None:
    problems, warnings = images.judge(plan.info, facts, images.host_arch())
    if problems:
        hint = "run `bcvk images inspect " + plan.opts.image + "` for details"
        if not facts.kernels:
            hint = (
                "this is not a bootc image: a bootc image carries a kernel under "
                "/usr/lib/modules/<version>/ (see images/README.md)"
            )
        raise BcvkError(f"image {plan.opts.image} cannot boot: {problems[0]}", hint=hint)
    for warning in warnings:
        if "virtiofs" in warning and plan.opts.rootfs == "block":
            continue
        logger.warning("%s: %s", plan.opts.image, warning)


def mount(plan: Plan) -> Path:
    """Mount the image for this VM (recorded first, so a killed bcvk's mount is reaped)."""
    if plan.mount_path is None:
        plan.record.mount = plan.info.id
        plan.record.mount_state = "mounting"
        plan.vmdir.write(plan.record)
        plan.mount_path = podman.mount_image(plan.info.id)
        plan.record.mount_state = "mounted"
        plan.vmdir.write(plan.record)
    return plan.mount_path


def unmount(plan: Plan) -> None:
    if plan.mount_path is not None:
        podman.unmount_image(plan.info.id)
        plan.mount_path = None
        plan.record.mount = None
        plan.record.mount_state = None
        plan.vmdir.write(plan.record)


def prepare(plan: Plan) -> None:
    opts = plan.opts
    prepared = rootfs.prepare(opts.image, plan.info.id, block=False, mount=lambda: mount(plan))
    judge(plan, prepared.facts)
    plan.kind, plan.virtiofsd = choose_rootfs(opts, prepared.facts)
    if plan.kind is RootfsKind.block:
        prepared = rootfs.prepare(opts.image, plan.info.id, block=True, mount=lambda: mount(plan))
        unmount(plan)
    plan.prepared = prepared
    plan.record.rootfs = plan.kind.value


def _helper_argv(plan: Plan, argv: list[str]) -> list[str]:
    """Wrap a virtiofsd command so that it can see rootless mounts."""
    if not podman.rootless():
        return argv
    if not plan.opts.detach:
        # podman unshare keeps its child alive if podman itself dies; tie it
        # to podman so that a killed bcvk leaves nothing behind.
        setpriv = run.find_binary("setpriv")
        if setpriv is not None:
            argv = [os.fspath(setpriv), "--pdeathsig", "TERM", "--", *argv]
    return podman.unshare_argv(argv)


def _spawn(plan: Plan, role: str, argv: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    plan.logs.append(out)
    proc = run.spawn(
        argv,
        stdout=kw.pop("stdout", out),
        stderr=out,
        die_with_parent=not plan.opts.detach,
        new_session=True,
        **kw,
    )
    plan.children.append(proc)
    entry = state.Proc.of(role, proc.pid)
    if role == "qemu":
        plan.record.qemu = entry
    else:
        plan.record.helpers.append(entry)
    plan.vmdir.write(plan.record)
    return proc


def _sequential() -> bool:
    # For measurements: the classic order (virtiofsd, wait for its socket, QEMU).
    return os.environ.get("BCVK_LAUNCH", "") == "sequential"


def _virtiofsd_argv(
    plan: Plan, shared: Path, index: int, readonly: bool, fd: int | None
) -> list[str]:
    assert plan.virtiofsd is not None
    socket_path = None if fd is not None else plan.vmdir.socket(index)
    # The image is immutable: the guest may cache everything it reads from
    # it, which under TCG makes the difference between a boot of a minute
    # and one of many.  Host directories may change under the guest: no cache.
    image = index == 0 and plan.kind is RootfsKind.virtiofs
    argv = virtiofsd.argv(
        plan.virtiofsd,
        shared,
        socket_path,
        readonly=readonly,
        fd=fd,
        cache="always" if image else "never",
    )
    return _helper_argv(plan, argv)


def _fd_passing() -> bool:
    # `podman unshare` hands inherited descriptors on to its command, so the
    # rootless virtiofsd gets its listening socket the same way.
    return not _sequential()


def _shares(plan: Plan) -> list[tuple[str, Path | None, bool]]:
    """(tag, host dir or None for the image, readonly) of every virtiofs share."""
    shares: list[tuple[str, Path | None, bool]] = []
    if plan.kind is RootfsKind.virtiofs:
        shares.append((qemu.ROOTFS_TAG, None, True))
    if plan.virtiofsd is not None:
        shares += [(b.tag, b.host, b.readonly) for b in plan.opts.binds]
    return shares


def _qemu_spec(
    plan: Plan,
    smbios: tuple[str, ...],
    extra_kargs: tuple[str, ...],
    virtiofs: tuple[qemu.VirtiofsShare, ...],
    drives: tuple[qemu.Drive, ...],
    accel_name: str,
    qmp_fd: int,
) -> qemu.QemuSpec:
    opts = plan.opts
    prepared = plan.prepared
    assert prepared is not None
    facts = prepared.facts
    ninep: tuple[qemu.NinePShare, ...] = ()
    if plan.virtiofsd is None:
        ninep = tuple(qemu.NinePShare(b.tag, os.fspath(b.host), b.readonly) for b in opts.binds)
    cmdline = qemu.kernel_args(
        rootfs=plan.kind,
        block_label=prepared.label,
        selinux_off=facts.selinux,
        extra=(*extra_kargs, *opts.kargs),
    )
    return qemu.QemuSpec(
        binary=plan.qemu_binary,
        accel=Accel(accel_name),
        memory_mib=opts.memory_mib,
        vcpus=opts.vcpus,
        kernel=os.fspath(prepared.kernel),
        initrd=os.fspath(prepared.initrd) if prepared.initrd else None,
        cmdline=" ".join(cmdline),
        ssh_port=plan.record.ssh_port,
        forwards=opts.ports,
        virtiofs=virtiofs,
        ninep=ninep,
        drives=drives,
        smbios=smbios,
        console_log=os.fspath(plan.record.console_log),
        console_on_stdio=opts.console,
        qmp_fd=qmp_fd,
        name=plan.record.name,
    )


def drives(plan: Plan) -> tuple[qemu.Drive, ...]:
    opts = plan.opts
    prepared = plan.prepared
    assert prepared is not None
    drives: list[qemu.Drive] = []
    if plan.kind is RootfsKind.block:
        assert prepared.rootfs is not None
        drives.append(qemu.Drive(os.fspath(prepared.rootfs), "raw", "bcvk-rootfs", readonly=True))
    for disk in opts.disks:
        if not disk.path.exists():
            size = max(2 * plan.info.size, 4 * GIB)
            _create_disk(disk, size)
        drives.append(qemu.Drive(os.fspath(disk.path), disk.format, disk.name))
    if opts.add_swap:
        swap = _make_swap(plan, opts.add_swap)
        drives.append(qemu.Drive(os.fspath(swap), "raw", "swap"))
    return tuple(drives)


def _create_disk(disk: DiskFile, size: int) -> None:
    if disk.format == "qcow2":
        run.run([run.require("qemu-img"), "create", "-q", "-f", "qcow2", disk.path, str(size)])
    else:
        with disk.path.open("xb") as f:
            f.truncate(size)


def _make_swap(plan: Plan, size: int) -> Path:
    # Large files belong on disk, not in the (often tmpfs) runtime dir.
    fd, name = tempfile.mkstemp(prefix=f"bcvk-swap-{plan.record.name}-", dir="/var/tmp")
    os.close(fd)
    plan.record.files.append(name)
    plan.vmdir.write(plan.record)
    path = Path(name)
    with path.open("r+b") as f:
        f.truncate(size)
    mkswap = run.require("mkswap", "/usr/sbin/mkswap", "/sbin/mkswap")
    run.run([mkswap, "-q", path])
    return path


def seed(plan: Plan, files: tuple[tuple[str, str], ...]) -> qemu.Drive | None:
    """A NoCloud seed (vfat labelled cidata) for images running cloud-init."""
    if not files:
        return None
    mkfs = run.find_binary("mkfs.vfat", "/usr/sbin/mkfs.vfat", "/sbin/mkfs.vfat")
    mcopy = run.find_binary("mcopy")
    if mkfs is None or mcopy is None:
        logger.warning("cloud-init seed skipped: mkfs.vfat or mcopy missing (dosfstools, mtools)")
        return None
    seed = plan.vmdir.path / "seed.img"
    with seed.open("wb") as f:
        f.truncate(2 * MIB)
    run.run([mkfs, "-n", "CIDATA", seed])
    for name, content in files:
        source = plan.vmdir.path / name
        source.write_text(content)
        run.run([mcopy, "-i", seed, source, f"::{name}"])
    return qemu.Drive(os.fspath(seed), "raw", "cidata", readonly=True)


def since_process_start() -> float:
    """Seconds since this process started (the launch phase is measured from there)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start
    except (OSError, ValueError, IndexError):
        return float("nan")


async def launch(
    plan: Plan,
    smbios: tuple[str, ...],
    kargs: tuple[str, ...],
    drives: tuple[qemu.Drive, ...],
    accel_name: str,
) -> None:
    """Start virtiofsd(s) and QEMU concurrently.

    The listening sockets exist before any child does (we bind them and pass
    the descriptors), so QEMU starts at once and its vhost-user handshake
    waits in the socket backlog until virtiofsd runs.  Sequential mode (for
    measurements) starts virtiofsd, waits for its socket, then QEMU.
    """
    vmdir = plan.vmdir
    qmp_sock = qmp.unix_listener(vmdir.qmp)
    plan.listeners.append(qmp_sock)
    fd_passing = _fd_passing()
    shares = _shares(plan)
    listeners: dict[int, socket.socket] = {}
    connected: dict[int, socket.socket] = {}
    if fd_passing:
        for index in range(len(shares)):
            listeners[index] = qmp.unix_listener(vmdir.socket(index))
            plan.listeners.append(listeners[index])
            # QEMU's end, connected already: it waits in the backlog until
            # virtiofsd accepts it.
            connected[index] = qmp.unix_connect(vmdir.socket(index))
            connected[index].setblocking(True)
            plan.listeners.append(connected[index])
    virtiofs = tuple(
        qemu.VirtiofsShare(
            tag,
            os.fspath(vmdir.socket(index)),
            connected[index].fileno() if index in connected else None,
        )
        for index, (tag, _, _) in enumerate(shares)
    )
    spec = _qemu_spec(plan, smbios, kargs, virtiofs, drives, accel_name, qmp_sock.fileno())
    qemu_argv = qemu.argv(spec)
    qemu_fds = [qmp_sock.fileno(), *(s.fileno() for s in connected.values())]

    async def start_share(index: int, host: Path | None, readonly: bool) -> None:
        shared = host if host is not None else await asyncio.to_thread(mount, plan)
        fd = listeners[index].fileno() if index in listeners else None
        argv = _virtiofsd_argv(plan, shared, index, readonly, fd)
        log = vmdir.path / f"virtiofsd-{index}.log"
        _spawn(plan, "virtiofsd", argv, log, pass_fds=[fd] if fd is not None else [])
        if fd is None:
            await _wait_socket(plan, vmdir.socket(index), log)

    def start_qemu() -> None:
        _spawn(
            plan,
            "qemu",
            qemu_argv,
            vmdir.qemu_log,
            pass_fds=qemu_fds,
            stdin=None if plan.opts.console else subprocess.DEVNULL,
            stdout=None if plan.opts.console else subprocess.DEVNULL,
        )
        logger.debug("launch phase: QEMU started %.3fs after bcvk started", since_process_start())

    if fd_passing:
        # Children are spawned from this (the main) thread: a parent-death
        # signal fires when the *thread* that forked the child exits.
        start_qemu()
        await asyncio.gather(*(start_share(i, host, ro) for i, (_, host, ro) in enumerate(shares)))
    else:
        for i, (_, host, ro) in enumerate(shares):
            await start_share(i, host, ro)
        start_qemu()
    for sock in plan.listeners:
        sock.close()
    plan.listeners.clear()


async def _wait_socket(plan: Plan, path: Path, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for child in plan.children:
            if child.poll() is not None:
                raise BcvkError(
                    f"virtiofsd exited with status {child.returncode} before creating {path.name}",
                    hint="; ".join(file_tail(log, 3)) or None,
                )
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for virtiofsd socket {path}")
        await asyncio.sleep(0.02)
