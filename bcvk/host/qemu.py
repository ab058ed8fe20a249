"""The QEMU binary, and the command line of an ephemeral VM as a pure function of a spec.

``argv(spec)`` starts nothing and reads no file: everything QEMU needs is in
the frozen ``QemuSpec``, so the command line can be checked against golden
files with no QEMU installed.  ``kernel_args`` builds the guest kernel command
line the same way.
"""

from __future__ import annotations

import enum
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from bcvk import run
from bcvk.values import Accel, PortForward


class RootfsKind(enum.StrEnum):
    """How the image's root filesystem reaches the guest."""

    virtiofs = "virtiofs"  # virtiofsd serving the mounted image read-only
    block = "block"  # a cached read-only ext4 image on virtio-blk


ROOTFS_TAG = "rootfs"
# The virtio-serial port a warm-startable guest's agent listens on
# (/dev/virtio-ports/org.bcvk.control in the guest).
CONTROL_PORT = "org.bcvk.control"
# Where the console goes when the user did not ask for it on the terminal.
SERIAL_ID = "serial0"


@dataclass(frozen=True)
class Drive:
    """An extra virtio-blk disk, visible in the guest as /dev/disk/by-id/virtio-SERIAL."""

    path: str
    format: str  # "raw" or "qcow2"
    serial: str
    readonly: bool = False


@dataclass(frozen=True)
class VirtiofsShare:
    """A vhost-user-fs device; ``fd`` is an inherited socket already connected
    to virtiofsd's listener, or ``None`` when QEMU connects to ``socket`` itself."""

    tag: str
    socket: str
    fd: int | None = None


@dataclass(frozen=True)
class NinePShare:
    """A 9p (virtio-9p) share, used for binds when no virtiofsd is available."""

    tag: str
    path: str
    readonly: bool


@dataclass(frozen=True)
class SerialPort:
    """A virtio-serial port the guest writes to (/dev/virtio-ports/NAME);
    QEMU appends what arrives to the file at PATH."""

    name: str
    path: str


@dataclass(frozen=True)
class QemuSpec:
    binary: str
    accel: Accel
    memory_mib: int
    vcpus: int
    kernel: str
    initrd: str | None
    cmdline: str
    ssh_port: int
    forwards: tuple[PortForward, ...] = ()
    virtiofs: tuple[VirtiofsShare, ...] = ()
    ninep: tuple[NinePShare, ...] = ()
    drives: tuple[Drive, ...] = ()
    smbios: tuple[str, ...] = ()  # type-11 strings, e.g. io.systemd.credential…
    ports: tuple[SerialPort, ...] = ()
    # QEMU's restrict=on: the guest reaches nothing outside; forwards still work.
    network_isolated: bool = False
    console_log: str | None = None
    console_on_stdio: bool = False
    qmp_fd: int | None = None  # listening socket we bound and pass to QEMU
    qmp_socket: str | None = None  # else QEMU binds this path itself
    name: str | None = None
    # Warm start (bcvk.ephemeral.warm): the control port's listening socket,
    # a VM generation ID (so a restored guest reseeds its RNG), and the
    # saved state to load instead of booting.
    control_fd: int | None = None
    vmgenid: bool = False
    incoming_fd: int | None = None


def find_qemu(arch: str | None = None) -> Path:
    """The QEMU every command runs: ``$QEMU_BIN``, else ``qemu-system-ARCH``, else
    RHEL's ``/usr/libexec/qemu-kvm``.  ``doctor`` checks this same binary."""
    explicit = os.environ.get("QEMU_BIN")
    if explicit:
        return Path(explicit)
    arch = arch or platform.machine()
    return run.require(f"qemu-system-{arch}", "/usr/libexec/qemu-kvm", why="to run VMs")


# Firmware and option ROMs QEMU loads into an ephemeral VM (SeaBIOS, the
# direct-kernel-boot ROM, virtio-net's ROM).  Debian packages them apart
# from QEMU, and they are part of a saved machine (bcvk.ephemeral.warm).
ROM_FILES = ("bios-256k.bin", "linuxboot_dma.bin", "efi-virtio.rom", "kvmvapic.bin")


# Where QEMU looks for them, under its prefix (Debian's QEMU searches the
# SeaBIOS and iPXE packages' directories too; Fedora links them in share/qemu).
ROM_DIRS = ("share/qemu", "share/seabios", "lib/ipxe/qemu")


def rom_files(binary: str) -> list[Path]:
    """The ROM_FILES of the QEMU at BINARY that exist (first found), links resolved."""
    prefix = Path(binary).resolve().parent.parent
    found = []
    for name in ROM_FILES:
        for directory in ROM_DIRS:
            if (prefix / directory / name).exists():
                found.append((prefix / directory / name).resolve())
                break
    return found


def escape_option(value: str) -> str:
    """QEMU's option syntax: a literal comma in a value is written twice."""
    return value.replace(",", ",,")


def machine_type(arch: str | None = None) -> str:
    arch = arch or platform.machine()
    return {"x86_64": "q35", "aarch64": "virt"}.get(arch, "q35")


def argv(spec: QemuSpec) -> list[str]:
    """The complete QEMU argv for SPEC, one option and its value per pair."""
    mem = f"{spec.memory_mib}M"
    args = [
        spec.binary,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-machine", f"{machine_type()},accel={spec.accel.value}",
        "-cpu", "host" if spec.accel is Accel.kvm else "max",
        "-smp", str(spec.vcpus),
        "-m", mem,
        "-kernel", spec.kernel,
    ]  # fmt: skip
    if spec.virtiofs:
        # vhost-user devices (virtiofsd) need guest RAM the daemon can map;
        # without them plain anonymous memory (which may use huge pages) is kept.
        args += ["-object", f"memory-backend-memfd,id=mem,size={mem},share=on"]
        args += ["-numa", "node,memdev=mem"]
    if spec.name:
        args += ["-name", escape_option(spec.name)]
    if spec.initrd:
        args += ["-initrd", spec.initrd]
    args += ["-append", spec.cmdline]

    # Console: always logged to a file; on the terminal only on request.
    if spec.console_on_stdio:
        chardev = f"stdio,id={SERIAL_ID},signal=on"
        if spec.console_log:
            chardev += f",logfile={escape_option(spec.console_log)},logappend=on"
        args += ["-chardev", chardev]
    elif spec.console_log:
        args += ["-chardev", f"file,id={SERIAL_ID},path={escape_option(spec.console_log)}"]
    else:
        args += ["-chardev", f"null,id={SERIAL_ID}"]
    args += ["-serial", f"chardev:{SERIAL_ID}"]

    # Control socket for orderly shutdown.
    if spec.qmp_fd is not None:
        args += ["-chardev", f"socket,id=qmp,fd={spec.qmp_fd},server=on,wait=off"]
        args += ["-mon", "chardev=qmp,mode=control"]
    elif spec.qmp_socket:
        args += [
            "-chardev",
            f"socket,id=qmp,path={escape_option(spec.qmp_socket)},server=on,wait=off",
        ]
        args += ["-mon", "chardev=qmp,mode=control"]

    # Entropy: under TCG a guest without it can stall waiting for randomness.
    args += ["-object", "rng-random,id=rng0,filename=/dev/urandom"]
    args += ["-device", "virtio-rng-pci,rng=rng0"]

    # Network: user-mode, forwards only ever on loopback.
    netdev = f"user,id=net0,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22"
    for fwd in spec.forwards:
        netdev += f",hostfwd=tcp:127.0.0.1:{fwd.host}-:{fwd.guest}"
    if spec.network_isolated:
        netdev += ",restrict=on"
    args += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0"]

    for i, share in enumerate(spec.virtiofs):
        chardev = f"vfs{i}"
        where = f"fd={share.fd}" if share.fd is not None else f"path={escape_option(share.socket)}"
        args += ["-chardev", f"socket,id={chardev},{where}"]
        args += ["-device", f"vhost-user-fs-pci,queue-size=1024,chardev={chardev},tag={share.tag}"]

    for i, share9 in enumerate(spec.ninep):
        opts = (
            f"local,id=fs9p{i},path={escape_option(share9.path)},"
            f"mount_tag={share9.tag},security_model=none"
        )
        if share9.readonly:
            opts += ",readonly=on"
        args += ["-virtfs", opts]

    for i, drive in enumerate(spec.drives):
        opts = f"file={escape_option(drive.path)},format={drive.format},if=none,id=drive{i}"
        if drive.readonly:
            opts += ",readonly=on"
        args += ["-drive", opts]
        args += ["-device", f"virtio-blk-pci,drive=drive{i},serial={drive.serial}"]

    for value in spec.smbios:
        args += ["-smbios", f"type=11,value={escape_option(value)}"]

    if spec.control_fd is not None or spec.ports:
        args += ["-device", "virtio-serial-pci,id=vser0"]
    for i, port in enumerate(spec.ports):
        path = escape_option(port.path)
        args += ["-chardev", f"file,id=port{i},path={path},append=on"]
        args += ["-device", f"virtserialport,bus=vser0.0,chardev=port{i},name={port.name}"]
    if spec.control_fd is not None:
        args += ["-chardev", f"socket,id=ctl,fd={spec.control_fd},server=on,wait=off"]
        args += ["-device", f"virtserialport,bus=vser0.0,chardev=ctl,name={CONTROL_PORT}"]
    if spec.vmgenid:
        args += ["-device", "vmgenid,guid=auto"]
    if spec.incoming_fd is not None:
        args += ["-incoming", f"fd:{spec.incoming_fd}"]
    return args


def kernel_args(
    *,
    rootfs: RootfsKind,
    block_label: str | None = None,
    selinux_off: bool = False,
    extra: tuple[str, ...] = (),
) -> tuple[str, ...]:
    """The guest kernel command line (user ``--karg``s last, so they win)."""
    args = ["console=ttyS0"]
    if rootfs is RootfsKind.virtiofs:
        # dracut (and systemd's fstab generator) accept root=virtiofs:TAG
        args += [f"root=virtiofs:{ROOTFS_TAG}", "rootflags=ro", "ro"]
    else:
        if not block_label:
            raise ValueError("block rootfs needs a filesystem label")
        args += [f"root=LABEL={block_label}", "rootfstype=ext4", "ro"]
    if selinux_off:
        args.append("selinux=0")
    # A panic or a guest reboot ends the VM (QEMU runs with -no-reboot)
    # instead of hanging until the SSH deadline.
    args.append("panic=-1")
    args += extra
    return tuple(args)
