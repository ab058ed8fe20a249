"""Starting the processes of an ephemeral VM: virtiofsd(s) and QEMU.

``Machine`` is what boots, decided before any process starts (``prepare``);
``Launch`` holds what one start owns until the VM runs or is torn down (the
image mount, sockets, children, log files).  ``launch`` starts the children
concurrently.  Every child is recorded in the VM's registry entry as soon as
it exists, so a bcvk killed at any point leaves a record the next command
can reap.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bcvk import run
from bcvk.ephemeral import cache, registry
from bcvk.ephemeral.options import DiskFile, Options, RootfsMode
from bcvk.errors import BcvkError, ToolMissingError, WaitTimeout, os_hint
from bcvk.guest import initrd
from bcvk.guest.mounts import Share
from bcvk.host import podman, qemu, qmp, virtiofsd
from bcvk.host.qemu import RootfsKind
from bcvk.image.facts import TreeFacts
from bcvk.image.inspect import host_arch, judge
from bcvk.log import file_tail, logger
from bcvk.values import GIB, Accel, format_size


@dataclass
class Launch:
    """What one start owns: its registry entry, the image mount, sockets, children."""

    opts: Options
    info: podman.ImageInfo
    vmdir: registry.VmDir
    record: registry.VmRecord
    mount_path: Path | None = None
    listeners: list[socket.socket] = field(default_factory=list)
    children: list[run.Process] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)
    initrd: Path | None = None  # this VM's own initramfs (--systemd-units), else the cache's
    cmdline: str | None = None  # the kernel's, once QEMU is started (see bcvk.guest.stall)

    def mount(self) -> Path:
        """Mount the image (recorded first, so a killed bcvk's mount is reaped)."""
        if self.mount_path is None:
            self.record.mount = self.info.id
            self.record.mount_state = "mounting"
            self.vmdir.write(self.record)
            self.mount_path = podman.mount_image(self.info.id)
            self.record.mount_state = "mounted"
            self.vmdir.write(self.record)
        return self.mount_path

    def unmount(self) -> None:
        if self.mount_path is not None:
            podman.unmount_image(self.info.id)
            self.mount_path = None
            self.record.mount = None
            self.record.mount_state = None
            self.vmdir.write(self.record)

    def close(self) -> None:
        """Close what only the starting process needs (children keep their copies)."""
        for sock in self.listeners:
            sock.close()
        self.listeners.clear()
        for f in self.logs:
            f.close()
        self.logs.clear()


@dataclass(frozen=True)
class Machine:
    """What boots, decided once: kernel, root transport, QEMU, accelerator."""

    opts: Options
    prepared: cache.Prepared
    transport: RootfsKind
    virtiofsd: Path | None  # serves the root (virtiofs) and binds; None: binds over 9p
    qemu: Path
    accel: Accel

    @property
    def facts(self) -> TreeFacts:
        return self.prepared.facts

    @property
    def ninep(self) -> bool:
        """Whether binds go over 9p (no virtiofsd on this host)."""
        return self.virtiofsd is None


def choose_rootfs(
    opts: Options, facts: TreeFacts | None, *, prefer_block: bool = False
) -> tuple[RootfsKind, Path | None]:
    """The rootfs transport and the virtiofsd to use (for binds too), if any.

    PREFER_BLOCK (a warm-startable VM: QEMU cannot save a virtiofs device)
    makes auto pick block.
    """
    binary = virtiofsd.find(opts.virtiofsd)  # raises if an explicit path is bad
    caps = facts.initramfs if facts else {}
    # root=virtiofs:TAG is systemd's (and dracut's); initramfs-tools mounts block devices only.
    no_virtiofs = bool(caps) and not (caps.get("virtiofs") and caps.get("systemd"))
    if opts.rootfs is RootfsMode.virtiofs:
        if binary is None:
            raise ToolMissingError("--rootfs virtiofs: virtiofsd not found", hint=virtiofsd.HINT)
        if no_virtiofs:
            raise BcvkError(
                f"--rootfs virtiofs: the initramfs of {opts.image} cannot mount a virtiofs root",
                hint="use --rootfs block (the default picks it for this image)",
            )
        return RootfsKind.virtiofs, binary
    if opts.rootfs is RootfsMode.block or prefer_block:
        return RootfsKind.block, binary
    if binary is None:
        logger.info(
            "virtiofsd not found; using --rootfs block (a read-only ext4 copy of the "
            "image, built once and cached)"
        )
        return RootfsKind.block, None
    if no_virtiofs and caps.get("virtio_blk") and caps.get("ext4"):
        logger.info("the image's initramfs cannot mount virtiofs; using --rootfs block")
        return RootfsKind.block, binary
    return RootfsKind.virtiofs, binary


def check_bootable(opts: Options, info: podman.ImageInfo, facts: TreeFacts) -> None:
    """Refuse, before QEMU starts, an image ``images inspect`` says cannot boot."""
    problems, warnings = judge(info, facts, host_arch())
    if problems:
        hint = "run `bcvk images inspect " + opts.image + "` for details"
        if facts.kernel_problem():
            hint = facts.kernel_hint()
        raise BcvkError(f"image {opts.image} cannot boot: {problems[0]}", hint=hint)
    for warning in warnings:
        if "virtiofs" in warning:
            continue  # choose_rootfs says which transport it takes, and why
        logger.warning("%s: %s", opts.image, warning)


def prepare(launch: Launch, *, prefer_block: bool = False) -> Machine:
    """The per-image cache entry, checked, with its transport, QEMU and accelerator."""
    from bcvk.host import accel

    opts, image_id = launch.opts, launch.info.id
    prepared = cache.prepare(opts.image, image_id, block=False, mount=launch.mount)
    check_bootable(opts, launch.info, prepared.facts)
    transport, binary = choose_rootfs(opts, prepared.facts, prefer_block=prefer_block)
    if transport is RootfsKind.block:
        prepared = cache.prepare(opts.image, image_id, block=True, mount=launch.mount)
        launch.unmount()
    launch.record.rootfs = transport.value
    binary_qemu = qemu.find_qemu()
    verdict = accel.decide(os.fspath(binary_qemu), prepared.kernel, override=opts.accel)
    launch.record.accel = verdict.accel
    logger.debug("accelerator %s: %s", verdict.accel, verdict.reason)
    return Machine(opts, prepared, transport, binary, binary_qemu, Accel(verdict.accel))


# ---------------------------------------------------------------- devices


def drives(machine: Machine, launch: Launch) -> tuple[qemu.Drive, ...]:
    """The block devices: the root image (block transport), --mount-disk-file, swap."""
    opts = machine.opts
    found: list[qemu.Drive] = []
    if machine.transport is RootfsKind.block:
        assert machine.prepared.rootfs is not None
        rootfs = os.fspath(machine.prepared.rootfs)
        found.append(qemu.Drive(rootfs, "raw", "bcvk-rootfs", readonly=True))
    for disk in opts.disks:
        if not disk.path.exists():
            _create_disk(launch, disk, max(2 * launch.info.size, 4 * GIB))
        found.append(qemu.Drive(os.fspath(disk.path), disk.format, disk.name))
    if opts.add_swap:
        swap = _make_swap(launch, opts.add_swap)
        found.append(qemu.Drive(os.fspath(swap), "raw", "swap"))
    return tuple(found)


def _create_disk(launch: Launch, disk: DiskFile, size: int) -> None:
    # Made for this VM: a failed start must not leave a multi-GiB file behind.
    launch.record.files.append(os.fspath(disk.path))
    launch.vmdir.write(launch.record)
    if disk.format == "qcow2":
        run.run([run.require("qemu-img"), "create", "-q", "-f", "qcow2", disk.path, str(size)])
    else:
        with disk.path.open("xb") as f, _sized("--mount-disk-file", disk.path, size):
            f.truncate(size)


@contextlib.contextmanager
def _sized(flag: str, path: Path, size: int) -> Iterator[None]:
    """A file of SIZE that the filesystem refuses is the user's size, not a bcvk bug."""
    try:
        yield
    except OSError as exc:
        raise BcvkError(
            f"{flag}: cannot make {path} {format_size(size)} large: {exc.strerror}",
            hint="ask for a smaller size" if exc.errno == errno.EFBIG else os_hint(exc),
        ) from None


def keep_created_disks(launch: Launch) -> None:
    """Once the VM runs, disks it created are the user's: no longer ours to remove."""
    made = {os.fspath(d.path) for d in launch.opts.disks}
    launch.record.files = [f for f in launch.record.files if f not in made]
    launch.vmdir.write(launch.record)


def _make_swap(launch: Launch, size: int) -> Path:
    # Large files belong on disk, not in the (often tmpfs) runtime dir.
    fd, name = tempfile.mkstemp(prefix=f"bcvk-swap-{launch.record.name}-", dir="/var/tmp")
    os.close(fd)
    launch.record.files.append(name)
    launch.vmdir.write(launch.record)
    path = Path(name)
    with path.open("r+b") as f, _sized("--add-swap", path, size):
        f.truncate(size)
    mkswap = run.require("mkswap", "/usr/sbin/mkswap", "/sbin/mkswap")
    run.run([mkswap, "-q", path])
    return path


# ---------------------------------------------------------------- processes


def _helper_argv(launch: Launch, argv: list[str]) -> list[str]:
    """Wrap a virtiofsd command so that it can see rootless mounts."""
    if not podman.rootless():
        return argv
    if not launch.opts.detach:
        # podman unshare keeps its child alive if podman itself dies; tie it
        # to podman so that a killed bcvk leaves nothing behind.
        setpriv = run.find_binary("setpriv")
        if setpriv is not None:
            argv = [os.fspath(setpriv), "--pdeathsig", "TERM", "--", *argv]
    return podman.unshare_argv(argv)


def _spawn(launch: Launch, role: str, argv: list[str], log: Path, **kw: Any) -> run.Process:
    out = log.open("ab")
    launch.logs.append(out)
    token = launch.record.token
    proc = run.spawn(
        argv,
        stdout=kw.pop("stdout", out),
        stderr=out,
        die_with_parent=not launch.opts.detach,
        new_session=True,
        env={registry.TOKEN_VAR: token},
        **kw,
    )
    launch.children.append(proc)
    entry = registry.Proc.of(role, proc.pid, token=token)
    if role == "qemu":
        launch.record.qemu = entry
    else:
        launch.record.helpers.append(entry)
    launch.vmdir.write(launch.record)
    return proc


def _sequential() -> bool:
    # For measurements: the classic order (virtiofsd, wait for its socket, QEMU).
    return os.environ.get("BCVK_LAUNCH", "") == "sequential"


@dataclass(frozen=True)
class _Served:
    """One virtiofs share: the image (host None) or a bind."""

    tag: str
    host: Path | None
    readonly: bool


def _served(machine: Machine) -> list[_Served]:
    served: list[_Served] = []
    if machine.transport is RootfsKind.virtiofs:
        served.append(_Served(qemu.ROOTFS_TAG, None, True))
    if not machine.ninep:
        served += [_Served(b.tag, Path(b.source), b.readonly) for b in machine.opts.binds]
    return served


def _virtiofsd_argv(
    machine: Machine, launch: Launch, shared: Path, index: int, readonly: bool, fd: int | None
) -> list[str]:
    assert machine.virtiofsd is not None
    socket_path = None if fd is not None else launch.vmdir.socket(index)
    # The image is immutable: the guest may cache everything it reads from
    # it, which under TCG makes the difference between a boot of a minute
    # and one of many.  Host directories may change under the guest: no cache.
    image = index == 0 and machine.transport is RootfsKind.virtiofs
    argv = virtiofsd.argv(
        machine.virtiofsd,
        shared,
        socket_path,
        readonly=readonly,
        fd=fd,
        cache="always" if image else "never",
    )
    return _helper_argv(launch, argv)


@dataclass(frozen=True)
class WarmDevices:
    """What a warm-startable VM adds: the control port, and the state to load."""

    control_fd: int
    incoming_fd: int | None = None  # restore: QEMU loads this instead of booting


def ninep_shares(binds: tuple[Share, ...]) -> tuple[qemu.NinePShare, ...]:
    return tuple(qemu.NinePShare(b.tag, b.source, b.readonly) for b in binds)


def serial_ports(opts: Options, vmdir: registry.VmDir) -> tuple[qemu.SerialPort, ...]:
    """The virtio-serial ports the guest's bcvk services write to (``bcvk.guest.initrd``)."""
    ports = [qemu.SerialPort(initrd.STATUS_PORT, os.fspath(vmdir.boot_report))]
    if opts.log_dir:
        ports += [qemu.SerialPort(port, os.fspath(p)) for port, p in opts.log_dir.journal_ports()]
    if opts.execute:
        ports += [
            qemu.SerialPort(initrd.EXECUTE_STDOUT_PORT, os.fspath(vmdir.execute("stdout"))),
            qemu.SerialPort(initrd.EXECUTE_STDERR_PORT, os.fspath(vmdir.execute("stderr"))),
            qemu.SerialPort(initrd.EXECUTE_STATUS_PORT, os.fspath(vmdir.execute("status"))),
        ]
    return tuple(ports)


def qemu_spec(
    machine: Machine,
    launch: Launch,
    smbios: tuple[str, ...],
    extra_kargs: tuple[str, ...],
    virtiofs: tuple[qemu.VirtiofsShare, ...],
    drives: tuple[qemu.Drive, ...],
    qmp_fd: int,
    warm: WarmDevices | None = None,
) -> qemu.QemuSpec:
    opts, prepared = machine.opts, machine.prepared
    boot_initrd = launch.initrd or prepared.initrd
    cmdline = qemu.kernel_args(
        rootfs=machine.transport,
        block_label=prepared.label,
        selinux_off=prepared.facts.selinux,
        extra=(*extra_kargs, *opts.kargs),
    )
    return qemu.QemuSpec(
        binary=os.fspath(machine.qemu),
        accel=machine.accel,
        memory_mib=opts.memory_mib,
        vcpus=opts.vcpus,
        kernel=os.fspath(prepared.kernel),
        initrd=os.fspath(boot_initrd)
        if (boot_initrd := launch.initrd or prepared.initrd)
        else None,
        cmdline=" ".join(cmdline),
        ssh_port=launch.record.ssh_port,
        forwards=opts.ports,
        virtiofs=virtiofs,
        ninep=ninep_shares(opts.binds) if machine.ninep else (),
        drives=drives,
        smbios=smbios,
        ports=serial_ports(opts, launch.vmdir),
        network_isolated=opts.network_isolation,
        console_log=os.fspath(launch.record.console_log),
        console_on_stdio=opts.console,
        qmp_fd=qmp_fd,
        name=launch.record.name,
        control_fd=warm.control_fd if warm else None,
        vmgenid=warm is not None,
        incoming_fd=warm.incoming_fd if warm else None,
    )


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
    machine: Machine,
    launch: Launch,
    smbios: tuple[str, ...],
    kargs: tuple[str, ...],
    drives: tuple[qemu.Drive, ...],
    *,
    warm: bool = False,
    incoming: int | None = None,
) -> None:
    """Start virtiofsd(s) and QEMU concurrently.

    WARM adds the control port (and INCOMING, a descriptor of a saved
    state, makes QEMU load it instead of booting).

    The listening sockets exist before any child does (we bind them and pass
    the descriptors), so QEMU starts at once and its vhost-user handshake
    waits in the socket backlog until virtiofsd runs.  Sequential mode (for
    measurements) starts virtiofsd, waits for its socket, then QEMU.
    """
    vmdir = launch.vmdir
    qmp_sock = qmp.unix_listener(vmdir.qmp)
    launch.listeners.append(qmp_sock)
    # `podman unshare` hands inherited descriptors on to its command, so the
    # rootless virtiofsd gets its listening socket the same way.
    fd_passing = not _sequential()
    served = _served(machine)
    listeners: dict[int, socket.socket] = {}
    connected: dict[int, socket.socket] = {}
    if fd_passing:
        for index in range(len(served)):
            listeners[index] = qmp.unix_listener(vmdir.socket(index))
            launch.listeners.append(listeners[index])
            # QEMU's end, connected already: it waits in the backlog until
            # virtiofsd accepts it.
            connected[index] = qmp.unix_connect(vmdir.socket(index))
            connected[index].setblocking(True)
            launch.listeners.append(connected[index])
    virtiofs = tuple(
        qemu.VirtiofsShare(
            share.tag,
            os.fspath(vmdir.socket(index)),
            connected[index].fileno() if index in connected else None,
        )
        for index, share in enumerate(served)
    )
    devices = None
    if warm:
        control = qmp.unix_listener(vmdir.control)
        launch.listeners.append(control)
        devices = WarmDevices(control.fileno(), incoming)
    spec = qemu_spec(machine, launch, smbios, kargs, virtiofs, drives, qmp_sock.fileno(), devices)
    qemu_argv = qemu.argv(spec)
    launch.cmdline = spec.cmdline
    qemu_fds = [qmp_sock.fileno(), *(s.fileno() for s in connected.values())]
    if devices is not None:
        qemu_fds.append(devices.control_fd)
        if incoming is not None:
            qemu_fds.append(incoming)

    async def start_share(index: int, share: _Served) -> None:
        shared = share.host if share.host is not None else await asyncio.to_thread(launch.mount)
        fd = listeners[index].fileno() if index in listeners else None
        argv = _virtiofsd_argv(machine, launch, shared, index, share.readonly, fd)
        log = vmdir.path / f"virtiofsd-{index}.log"
        _spawn(launch, "virtiofsd", argv, log, pass_fds=[fd] if fd is not None else [])
        if fd is None:
            await _wait_socket(launch, vmdir.socket(index), log)

    def start_qemu() -> None:
        _spawn(
            launch,
            "qemu",
            qemu_argv,
            vmdir.qemu_log,
            pass_fds=qemu_fds,
            stdin=None if machine.opts.console else subprocess.DEVNULL,
            stdout=None if machine.opts.console else subprocess.DEVNULL,
        )
        logger.debug("launch phase: QEMU started %.3fs after bcvk started", since_process_start())

    if fd_passing:
        # Children are spawned from this (the main) thread: a parent-death
        # signal fires when the *thread* that forked the child exits.
        start_qemu()
        await asyncio.gather(*(start_share(i, share) for i, share in enumerate(served)))
    else:
        for i, share in enumerate(served):
            await start_share(i, share)
        start_qemu()
    for sock in launch.listeners:
        sock.close()
    launch.listeners.clear()


async def _wait_socket(launch: Launch, path: Path, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for child in launch.children:
            if child.poll() is not None:
                raise BcvkError(
                    f"virtiofsd exited with status {child.returncode} before creating {path.name}",
                    hint="; ".join(file_tail(log, 3)) or "rerun with --debug for its messages",
                )
        if time.monotonic() > deadline:
            raise WaitTimeout(
                f"timed out after {timeout:.0f}s waiting for virtiofsd socket {path}",
                hint="the host may be overloaded; --rootfs block needs no virtiofsd",
            )
        await asyncio.sleep(0.02)
