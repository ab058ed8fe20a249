"""Ephemeral VMs: boot a bootc image straight from the container store.

The image's own kernel and initramfs boot directly (no bootloader); the root
filesystem comes read-only from the image (virtiofs, or a cached ext4 image on
virtio-blk) under ``systemd.volatile=overlay``, so the guest can write to ``/``
and every write vanishes with the VM.  An SSH key made for the VM arrives as a
systemd credential; readiness is a real ``ssh … true``.

Python API (synchronous; call it from the main thread, because children die
with the thread that started them)::

    from bcvk import ephemeral
    with ephemeral.start("localhost/bcvk/debian-bootc:12", memory="1G") as vm:
        print(vm.ssh("uname -r").stdout)
    status = ephemeral.run_ssh(IMAGE, ["exit", "42"])    # → 42
    ephemeral.ps(); ephemeral.rm(NAME)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from bcvk import accel, credentials, images, podman, qemu, qmp, rootfs, run, ssh, state, virtiofsd
from bcvk.config import GIB, MIB, parse_size
from bcvk.errors import BcvkError, NotFoundError, ToolMissingError, UsageError, WaitTimeout
from bcvk.imagetree import TreeFacts
from bcvk.log import logger
from bcvk.qemu import Accel, PortForward, RootfsKind

DEFAULT_MEMORY = "2G"
DEFAULT_SSH_TIMEOUT = 240.0
MIN_MEMORY_MIB = 128
MAX_MEMORY_MIB = 1024 * 1024  # 1 TiB
MAX_VCPUS = 256
ROOTFS_CHOICES = ("auto", "virtiofs", "block")
PULL_CHOICES = ("missing", "always", "never")

# KubeVirt U-series instance types: name → (vCPUs, memory MiB).
ITYPES: dict[str, tuple[int, int]] = {
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

_SHARE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,30}$")
_SERIAL_RE = re.compile(r"^[A-Za-z0-9_-]{1,20}$")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|[\x00-\x08\x0b-\x1f\x7f]")


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


# ---------------------------------------------------------------- guest helpers


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


def mount_command(bind: Bind, ninep: bool) -> str:
    """Shell text run in the guest (as root) to mount a host share."""
    target = shlex.quote(bind.guest_path)
    if ninep:
        opts = "trans=virtio,version=9p2000.L,msize=524288" + (",ro" if bind.readonly else "")
        mount = f"mount -t 9p -o {opts} {bind.tag} {target}"
    else:
        mount = f"mount -t virtiofs {'-o ro ' if bind.readonly else ''}{bind.tag} {target}"
    return f"mkdir -p {target} && {mount}"


def no_ssh_hint(facts: TreeFacts | None) -> str:
    if facts is not None and not facts.sshd_installed:
        return "the image has no sshd (/usr/sbin/sshd is missing): install openssh-server in it"
    if facts is not None and not facts.sshd_enabled:
        return "sshd is installed in the image but not enabled: `systemctl enable sshd` (or ssh)"
    return "see the console log; a slow host may need a longer --ssh-timeout"


# ---------------------------------------------------------------- the VM


class Vm:
    """A running ephemeral VM.

    Owned VMs (started in this process) are torn down by ``stop()`` or when
    the ``with`` block ends; VMs found by ``attach()`` are only stopped when
    asked.
    """

    def __init__(
        self,
        vmdir: state.VmDir,
        record: state.VmRecord,
        *,
        facts: TreeFacts | None = None,
        children: Sequence[subprocess.Popen[bytes]] = (),
        owner: bool = False,
    ) -> None:
        self.dir = vmdir
        self.record = record
        self.facts = facts
        self.children = list(children)
        self.owner = owner
        self.stopped = False

    # -- facts
    @property
    def name(self) -> str:
        return self.record.name

    @property
    def ssh_port(self) -> int:
        return self.record.ssh_port

    @property
    def key(self) -> Path:
        return self.dir.key

    @property
    def console_log(self) -> Path:
        return Path(self.record.console_log or self.dir.console_log)

    def target(self, connect_timeout: int = 5) -> ssh.Target:
        return ssh.Target(port=self.ssh_port, key=self.key, connect_timeout=connect_timeout)

    def alive(self) -> bool:
        return self.record.qemu is not None and self.record.qemu.alive()

    # -- guest access
    def ssh(
        self,
        command: str | Sequence[str],
        *,
        check: bool = False,
        capture: bool = True,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run COMMAND in the guest as root; output captured unless CAPTURE is off."""
        words = [command] if isinstance(command, str) else list(command)
        result = ssh.execute(self.target(), words, capture=capture, timeout=timeout)
        if check and result.returncode != 0:
            raise BcvkError(
                f"command failed in VM {self.name} with exit status {result.returncode}: "
                + shlex.join(words),
                hint=(result.stderr or "").strip()[-500:] or None,
            )
        return result

    def wait_ready(self, timeout: float = DEFAULT_SSH_TIMEOUT, *, progress: bool = False) -> None:
        """Block until ``ssh … true`` succeeds (or raise with the likely cause)."""
        asyncio.run(_wait_ready(self, timeout, progress=progress, allow_poweroff=False))

    # -- lifecycle
    def stop(self, *, graceful: bool = True, timeout: float = 30.0) -> None:
        """Power the VM off (ACPI, then QMP quit, SIGTERM, SIGKILL) and remove its state."""
        if self.stopped:
            return
        with _signals_deferred():
            _teardown(self, graceful=graceful, timeout=timeout)
        self.stopped = True

    def __enter__(self) -> Vm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(graceful=False)

    def __repr__(self) -> str:
        return f"<Vm {self.name} ssh=127.0.0.1:{self.ssh_port}>"


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while tearing down, deliver them afterwards.

    A second Ctrl-C must not abandon a half-finished clean-up; every step
    of the clean-up has its own deadline, so the wait is bounded.
    """
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _wait_exit(vm: Vm, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in vm.children:
            child.poll()
        if not vm.alive():
            return True
        time.sleep(0.1)
    return not vm.alive()


def _teardown(vm: Vm, *, graceful: bool, timeout: float) -> None:
    record = vm.record
    if record.phase != "stopping" and vm.dir.path.exists():
        record.phase = "stopping"
        with contextlib.suppress(OSError):
            vm.dir.write(record)
    if vm.alive():
        if graceful:
            logger.debug("powering %s down", vm.name)
            if qmp.powerdown(vm.dir.qmp):
                _wait_exit(vm, timeout)
        if vm.alive() and qmp.quit(vm.dir.qmp):
            _wait_exit(vm, 5.0)
        if vm.alive() and record.qemu is not None:
            logger.debug("QEMU of %s did not quit; terminating it", vm.name)
            state.terminate([record.qemu], timeout=5.0)
    # virtiofsd exits by itself once QEMU hangs up; anything else gets signals.
    state.terminate(list(record.helpers), timeout=3.0)
    for child in vm.children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)
    state.reap(vm.dir, record)


# ---------------------------------------------------------------- launch


@dataclass
class _Plan:
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


def _qemu_binary() -> str:
    explicit = os.environ.get("QEMU_BIN")
    if explicit:
        return explicit
    arch = os.uname().machine
    return os.fspath(run.require(f"qemu-system-{arch}", "/usr/libexec/qemu-kvm", why="to run VMs"))


def _choose_rootfs(opts: Options, facts: TreeFacts | None) -> tuple[RootfsKind, Path | None]:
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


def _judge(plan: _Plan, facts: TreeFacts) -> None:
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


def _mount(plan: _Plan) -> Path:
    """Mount the image for this VM (recorded first, so a killed bcvk's mount is reaped)."""
    if plan.mount_path is None:
        plan.record.mount = plan.info.id
        plan.record.mount_state = "mounting"
        plan.vmdir.write(plan.record)
        plan.mount_path = podman.mount_image(plan.info.id)
        plan.record.mount_state = "mounted"
        plan.vmdir.write(plan.record)
    return plan.mount_path


def _unmount(plan: _Plan) -> None:
    if plan.mount_path is not None:
        podman.unmount_image(plan.info.id)
        plan.mount_path = None
        plan.record.mount = None
        plan.record.mount_state = None
        plan.vmdir.write(plan.record)


def _prepare(plan: _Plan) -> None:
    opts = plan.opts
    prepared = rootfs.prepare(opts.image, plan.info.id, block=False, mount=lambda: _mount(plan))
    _judge(plan, prepared.facts)
    plan.kind, plan.virtiofsd = _choose_rootfs(opts, prepared.facts)
    if plan.kind is RootfsKind.block:
        prepared = rootfs.prepare(opts.image, plan.info.id, block=True, mount=lambda: _mount(plan))
        _unmount(plan)
    plan.prepared = prepared
    plan.record.rootfs = plan.kind.value


def _helper_argv(plan: _Plan, argv: list[str]) -> list[str]:
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


def _spawn(
    plan: _Plan, role: str, argv: list[str], log: Path, **kw: Any
) -> subprocess.Popen[bytes]:
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
    plan: _Plan, shared: Path, index: int, readonly: bool, fd: int | None
) -> list[str]:
    assert plan.virtiofsd is not None
    socket_path = None if fd is not None else plan.vmdir.socket(index)
    argv = virtiofsd.argv(
        plan.virtiofsd,
        shared,
        socket_path,
        readonly=readonly,
        fd=fd,
        allow_mmap=readonly,
    )
    return _helper_argv(plan, argv)


def _fd_passing() -> bool:
    # podman unshare does not hand inherited descriptors to its command, so
    # rootless virtiofsd creates its socket itself and QEMU waits for it.
    return not podman.rootless() and not _sequential()


def _shares(plan: _Plan) -> list[tuple[str, Path | None, bool]]:
    """(tag, host dir or None for the image, readonly) of every virtiofs share."""
    shares: list[tuple[str, Path | None, bool]] = []
    if plan.kind is RootfsKind.virtiofs:
        shares.append((qemu.ROOTFS_TAG, None, True))
    if plan.virtiofsd is not None:
        shares += [(b.tag, b.host, b.readonly) for b in plan.opts.binds]
    return shares


def _qemu_spec(
    plan: _Plan,
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


def _drives(plan: _Plan) -> tuple[qemu.Drive, ...]:
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


def _make_swap(plan: _Plan, size: int) -> Path:
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


def _seed(plan: _Plan, files: tuple[tuple[str, str], ...]) -> qemu.Drive | None:
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


def _since_process_start() -> float:
    """Seconds since this process started (the launch phase is measured from there)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start
    except (OSError, ValueError, IndexError):
        return float("nan")


async def _launch(
    plan: _Plan,
    smbios: tuple[str, ...],
    kargs: tuple[str, ...],
    drives: tuple[qemu.Drive, ...],
    accel_name: str,
) -> None:
    """Start virtiofsd(s) and QEMU concurrently.

    The listening sockets exist before any child does (we bind them and pass
    the descriptors), so QEMU starts at once and its vhost-user handshake
    waits in the socket backlog until virtiofsd runs.  Rootless (podman
    unshare passes no descriptors) and sequential mode wait for each socket.
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
        shared = host if host is not None else await asyncio.to_thread(_mount, plan)
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
        logger.debug("launch phase: QEMU started %.3fs after bcvk started", _since_process_start())

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


async def _wait_socket(plan: _Plan, path: Path, log: Path, timeout: float = 30.0) -> None:
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


class _Progress:
    """One self-rewriting status line on a terminal (elapsed + last console line)."""

    def __init__(self, enabled: bool, what: str, console: Path) -> None:
        self.enabled = enabled
        self.what = what
        self.console = console
        self.start = time.monotonic()
        self.shown = False

    def update(self) -> None:
        if not self.enabled:
            return
        width = 100
        with contextlib.suppress(OSError):
            width = os.get_terminal_size(sys.stderr.fileno()).columns
        last = console_tail(self.console, 1)
        line = f"{self.what} {time.monotonic() - self.start:4.0f}s"
        if last:
            line += f"  {last[0]}"
        sys.stderr.write("\r\033[K" + line[: max(10, width - 1)])
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


def _qemu_child(vm: Vm) -> subprocess.Popen[bytes] | None:
    """Our Popen of the VM's QEMU (polled, so that its exit status is known)."""
    pid = vm.record.qemu.pid if vm.record.qemu else -1
    for child in vm.children:
        if child.pid == pid:
            child.poll()
            return child
    return None


class GuestPoweredOff(Exception):
    """The guest shut down before SSH answered (e.g. systemd.unit=poweroff.target)."""


def _qemu_exit_error(vm: Vm, returncode: int | None) -> BcvkError:
    stderr = file_tail(vm.dir.qemu_log, 8)
    tail = console_tail(vm.console_log, 12)
    if stderr:
        message = f"QEMU exited during boot (status {returncode}): " + stderr[-1]
        detail = "\n".join("  qemu: " + line for line in stderr)
    else:
        message = f"VM {vm.name} stopped during boot (QEMU status {returncode})"
        detail = "\n".join("  console: " + line for line in tail)
    panic = any("Kernel panic" in line for line in tail)
    hint = f"QEMU's messages: {vm.dir.qemu_log}"
    if panic:
        hint = (
            "the guest kernel panicked; see the console lines above (wrong root=, missing driver?)"
        )
    return BcvkError(message + ("\n" + detail if detail else ""), hint=hint)


async def _wait_ready(vm: Vm, timeout: float, *, progress: bool, allow_poweroff: bool) -> None:
    """Poll ``ssh … true`` until it succeeds, QEMU exits, or TIMEOUT passes."""
    target = vm.target(connect_timeout=5)
    bar = _Progress(progress, f"Booting {vm.name}…", vm.console_log)
    deadline = time.monotonic() + timeout
    probe: asyncio.Task[bool] | None = None
    try:
        while True:
            qemu_proc = _qemu_child(vm)
            if not vm.alive():
                code = qemu_proc.wait() if qemu_proc is not None else None
                tail = console_tail(vm.console_log, 30)
                powered_off = code == 0 and any(
                    "reboot: Power down" in line or "Powering off" in line for line in tail
                )
                if powered_off and allow_poweroff:
                    raise GuestPoweredOff()
                raise _qemu_exit_error(vm, code)
            if probe is None:
                probe = asyncio.ensure_future(asyncio.to_thread(ssh.probe, target))
            elif probe.done():
                if probe.result():
                    return
                probe = None
                continue
            if time.monotonic() > deadline:
                tail = console_tail(vm.console_log, 12)
                lines = "\n".join("  console: " + line for line in tail) or "  (console is empty)"
                raise WaitTimeout(
                    f"VM {vm.name} did not answer SSH on 127.0.0.1:{vm.ssh_port} within "
                    f"{timeout:.0f}s; last console lines:\n{lines}",
                    hint=no_ssh_hint(vm.facts) + f" (console log: {vm.console_log})",
                )
            bar.update()
            await asyncio.sleep(0.5)
    finally:
        bar.clear()
        if probe is not None and not probe.done():
            # A probe in flight finishes on its own (ssh has a connect timeout).
            probe.cancel()


def _after_ready(vm: Vm, plan: _Plan) -> None:
    """Set up what systemd < 256 cannot take as credentials: mounts, swap, journal."""
    opts = plan.opts
    ninep = plan.virtiofsd is None
    script = [mount_command(b, ninep) for b in opts.binds]
    if opts.add_swap:
        script.append("swapon /dev/disk/by-id/virtio-swap")
    if script:
        result = vm.ssh(" && ".join(script))
        if result.returncode != 0:
            raise BcvkError(
                f"could not set up shares/swap in VM {vm.name}: "
                + ((result.stderr or "").strip().splitlines() or ["?"])[-1],
                hint="the guest kernel needs virtiofs (or 9p) modules for --bind",
            )
    if opts.log_dir and opts.log_dir.journal:
        argv = ssh.argv(
            vm.target(), ["journalctl", "-b", "-f", "-o", "json", "--no-pager"], tty=False
        )
        out = (opts.log_dir.directory / "journal.json").open("ab")
        plan.logs.append(out)
        proc = run.spawn(
            argv,
            stdout=out,
            stderr=subprocess.DEVNULL,
            new_session=True,
            die_with_parent=not opts.detach,
        )
        vm.children.append(proc)
        vm.record.helpers.append(state.Proc.of("journal", proc.pid))
        vm.dir.write(vm.record)


def _ensure_image(opts: Options) -> podman.ImageInfo:
    try:
        return podman.ensure_image(opts.image, opts.pull)
    except NotFoundError as exc:
        if opts.pull == "never":
            raise NotFoundError(
                f"image {opts.image} is not in local storage",
                hint="build or pull it first, or drop --pull never",
            ) from exc
        raise


def start(image: str | Options, **kwargs: Any) -> Vm:
    """Boot IMAGE and return when SSH answers (or, detached, once QEMU runs).

    Keyword arguments are those of ``make_options`` (CLI spellings:
    ``memory="2G"``, ``binds=["/srv:data"]``, …).  On any failure nothing is
    left behind: processes, image mount and state directory are removed.
    """
    opts = image if isinstance(image, Options) else make_options(image, **kwargs)
    return _start(opts)


def _start(opts: Options) -> Vm:
    check_ports_free(opts.ports)
    if opts.virtiofsd is not None or opts.rootfs == "virtiofs":
        # Fail before any work when an explicitly requested virtiofsd is unusable.
        _choose_rootfs(opts, None)
    info = _ensure_image(opts)
    name = opts.name or new_name()
    supervisor = None if opts.detach else state.Proc.of("bcvk", os.getpid(), group=False)

    def make_record(used: set[int]) -> state.VmRecord:
        return state.VmRecord(
            name=name,
            image=opts.image,
            image_id=info.id,
            ssh_port=free_port(used | {f.host_port for f in opts.ports}),
            forwards=[(f.host_port, f.guest_port) for f in opts.ports],
            memory_mib=opts.memory_mib,
            vcpus=opts.vcpus,
            detached=opts.detach,
            supervisor=supervisor,
            rootless=podman.rootless(),
        )

    vmdir, record = state.create(name, make_record)
    plan = _Plan(opts, info, vmdir, record)
    vm = Vm(vmdir, record, owner=True)
    try:
        if opts.log_dir:
            opts.log_dir.directory.mkdir(parents=True, exist_ok=True)
        record.console_log = os.fspath(
            opts.log_dir.directory / "console.txt"
            if opts.log_dir and opts.log_dir.console
            else vmdir.console_log
        )
        _prepare(plan)
        assert plan.prepared is not None
        vm.facts = plan.prepared.facts
        plan.qemu_binary = _qemu_binary()
        verdict = accel.decide(plan.qemu_binary, plan.prepared.kernel, override=opts.accel)
        record.accel = verdict.accel
        logger.debug("accelerator %s: %s", verdict.accel, verdict.reason)
        key = ssh.generate_key(vmdir.path, comment=f"bcvk-{name}")
        facts = plan.prepared.facts
        routes = credentials.choose_routes(facts.systemd_version, facts.has_cloud_init)
        injection = credentials.inject_key(key.public_text(), routes, hostname=name)
        drives = _drives(plan)
        seed = _seed(plan, injection.nocloud)
        if seed is not None:
            drives = (*drives, seed)
        vmdir.write(record)
        asyncio.run(_launch(plan, injection.smbios, injection.kernel_args, drives, verdict.accel))
        vm.children = plan.children
        record.phase = "running"
        vmdir.write(record)
        if opts.detach:
            _confirm_started(vm)
            record.supervisor = None
            vmdir.write(record)
            vm.owner = False
            return vm
        progress = opts.progress if opts.progress is not None else sys.stderr.isatty()
        asyncio.run(
            _wait_ready(
                vm,
                opts.ssh_timeout,
                progress=progress and not opts.console,
                allow_poweroff=not opts.execute,
            )
        )
        _after_ready(vm, plan)
        return vm
    except GuestPoweredOff:
        vm.stop(graceful=False)
        raise
    except BaseException:
        vm.children = plan.children
        with _signals_deferred():
            for sock in plan.listeners:
                sock.close()
            _teardown(vm, graceful=False, timeout=0)
        raise
    finally:
        for f in plan.logs:
            f.close()


def _confirm_started(vm: Vm, timeout: float = 60.0) -> None:
    """For detached VMs: QEMU answers QMP (its devices, virtiofs included, are up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in vm.children:
            child.poll()
        if not vm.alive():
            qemu_proc = _qemu_child(vm)
            raise _qemu_exit_error(vm, qemu_proc.wait() if qemu_proc else None)
        if qmp.status(vm.dir.qmp) in ("running", "prelaunch"):
            return
        time.sleep(0.2)
    raise WaitTimeout(
        f"QEMU of VM {vm.name} did not answer on its control socket in {timeout:.0f}s"
    )


# ---------------------------------------------------------------- verbs


def run_vm(opts: Options) -> int:
    """`ephemeral run` in the foreground: boot, then run --execute or wait for the end."""
    try:
        vm = _start(opts)
    except GuestPoweredOff:
        logger.info("the VM powered off")
        return 0
    if opts.detach:
        return 0
    with vm:
        if opts.execute:
            status = 0
            for command in opts.execute:
                status = vm.ssh(command, capture=False).returncode
                if status != 0:
                    logger.error("--execute %r exited with status %d", command, status)
                    break
            vm.stop(graceful=True, timeout=30)
            return status
        logger.info(
            "VM %s is ready: `bcvk ephemeral ssh %s`; it stops when powered off or on Ctrl-C",
            vm.name,
            vm.name,
        )
        try:
            while vm.alive():
                for child in vm.children:
                    child.poll()
                time.sleep(0.5)
        except KeyboardInterrupt:
            logger.info("stopping VM %s…", vm.name)
            vm.stop(graceful=True, timeout=20)
            raise
        logger.info("the VM powered off")
        vm.stop(graceful=False)
    return 0


def run_ssh(
    image: str | Options,
    command: Sequence[str] = (),
    *,
    interactive: bool | None = None,
    **kwargs: Any,
) -> int:
    """Boot IMAGE, run COMMAND over SSH, tear the VM down; the remote exit status.

    Without COMMAND an interactive shell is opened (on a terminal).
    """
    opts = image if isinstance(image, Options) else make_options(image, **kwargs)
    if opts.detach:
        raise UsageError("run-ssh cannot detach")
    vm = _start(opts)
    try:
        if interactive is None:
            interactive = not command and sys.stdin.isatty()
        if interactive or not command:
            return ssh.interactive(vm.target(), list(command))
        return int(vm.ssh(list(command), capture=False).returncode)
    finally:
        vm.stop(graceful=False)


def attach(name: str) -> Vm:
    """A running VM by name (started detached or by another bcvk)."""
    found = state.lookup(name)
    if found is None:
        raise NotFoundError(
            f"no ephemeral VM named {name!r}", hint="list them with `bcvk ephemeral ps`"
        )
    d, record = found
    return Vm(d, record, facts=rootfs.entry_for(record.image_id).facts(), owner=False)


def ssh_into(name: str, args: Sequence[str] = (), *, timeout: float = DEFAULT_SSH_TIMEOUT) -> int:
    """`ephemeral ssh NAME [SSH-OPTIONS] [COMMAND…]`; returns ssh's exit status."""
    vm = attach(name)
    options, command = split_ssh_args(args)
    if not ssh.probe(vm.target(connect_timeout=5)):
        asyncio.run(_wait_ready(vm, timeout, progress=sys.stderr.isatty(), allow_poweroff=False))
    tty = None if command else True
    argv = ssh.argv(vm.target(), command, tty=tty, extra=options)
    result = run.run(argv, check=False, capture=False, stdout=1, stdin=0)
    return int(result.returncode)


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


@dataclass(frozen=True)
class VmInfo:
    name: str
    image: str
    state: str
    ssh_port: int
    pid: int | None
    rootfs: str
    created: float
    memory_mib: int
    vcpus: int
    detached: bool
    forwards: list[tuple[int, int]]

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "image": self.image,
            "state": self.state,
            "ssh_port": self.ssh_port,
            "pid": self.pid,
            "rootfs": self.rootfs,
            "created": int(self.created),
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "detached": self.detached,
            "ports": [f"{h}:{g}" for h, g in self.forwards],
        }


def ps() -> list[VmInfo]:
    """Running ephemeral VMs (stale state is reaped on the way)."""
    return [
        VmInfo(
            name=record.name,
            image=record.image,
            state=record.status(),
            ssh_port=record.ssh_port,
            pid=record.qemu.pid if record.qemu else None,
            rootfs=record.rootfs,
            created=record.created,
            memory_mib=record.memory_mib,
            vcpus=record.vcpus,
            detached=record.detached,
            forwards=list(record.forwards),
        )
        for _, record in state.scan()
    ]


def rm(name: str, *, force: bool = False) -> bool:
    """Stop VM NAME and remove its state; False if there was none (with FORCE)."""
    existed = state.vm_dir(name).path.exists()
    found = state.lookup(name)
    if found is None:
        if existed and not state.vm_dir(name).path.exists():
            # It had stopped (say, QEMU was killed); looking it up reaped
            # what it left behind, which is what removing it means.
            logger.info("VM %s had already stopped; removed what it left behind", name)
            return True
        if force:
            return False
        raise NotFoundError(
            f"no ephemeral VM named {name!r}", hint="list them with `bcvk ephemeral ps`"
        )
    d, record = found
    vm = Vm(d, record, owner=False)
    # A foreground bcvk supervising this VM cleans up after itself once
    # QEMU is gone; we stop QEMU and, to be sure, reap what is left.
    vm.stop(graceful=not force, timeout=30)
    return True


def rm_all(*, force: bool = True) -> list[str]:
    names = [record.name for _, record in state.scan()]
    for name in names:
        rm(name, force=True)
    return names
