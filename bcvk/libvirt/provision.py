"""Creating a persistent VM: from ``RunOptions`` to a defined (and started) domain.

``create_vm`` runs the stages in order: ``resolve`` the request (name,
resources, ports, image) with nothing created yet, ``base_disk`` (build or
reuse), ``shares`` (virtiofs and how read-only is enforced), then, under an
undo log so that a failure leaves nothing, the SSH key, the VM's disk, the
domain XML, define/start and the wait for SSH.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bcvk import __version__, paths, to_disk
from bcvk.errors import BcvkError, NotFoundError, UsageError
from bcvk.guest import credentials, mounts, stall
from bcvk.guest.logdir import LogDir
from bcvk.guest.mounts import Share, ShareKind
from bcvk.host import podman, secureboot, ssh, virtiofsd
from bcvk.libvirt import basedisks, lifecycle
from bcvk.libvirt import xml as lx
from bcvk.libvirt.connection import Connection, DomainRef
from bcvk.libvirt.lifecycle import SSH_TIMEOUT
from bcvk.libvirt.pending import Undo, transaction
from bcvk.libvirt.vms import (
    Vm,
    all_vms,
    default_console_log,
    default_log,
    derive_name,
    key_dir,
    pick_ssh_port,
    port_bindable,
    read_vm,
    readonly_mode,
    readonly_wrapper_text,
    resources,
    used_ports,
)
from bcvk.log import logger, step
from bcvk.values import (
    GIB,
    Accel,
    Firmware,
    Network,
    PortForward,
    validate_label,
    validate_vm_name,
)  # fmt: skip

DEFAULT_DISK_SIZE = 20 * GIB
# A serial console is only useful if the kernel writes to it; the user's
# --karg come after, so their own console= wins.
DEFAULT_KARGS = ("console=ttyS0",)
FIRMWARE_LOG_FILE = "firmware.txt"  # in --log-dir DIR

# systemd learnt systemd.extra-unit.* / unit-dropin credentials in 256.
MOUNT_CREDENTIALS_MIN_SYSTEMD = 256


@dataclass(frozen=True)
class RunOptions:
    """Everything ``bcvk libvirt run`` accepts, as typed values."""

    name: str | None = None
    replace: bool = False
    memory: int | None = None  # bytes
    vcpus: int | None = None
    itype: str | None = None
    disk_size: int = DEFAULT_DISK_SIZE
    filesystem: to_disk.Filesystem | None = None
    root_size: int | None = None
    kargs: tuple[str, ...] = ()
    ports: tuple[PortForward, ...] = ()
    shares: tuple[Share, ...] = ()
    firmware: Firmware = Firmware.uefi
    network: Network = Network.user
    virtiofsd: Path | None = None  # for the shares  [default: the search order]
    secure_boot_keys: secureboot.Keys | None = None  # with Firmware.uefi_secure
    ssh_key: Path | None = None
    tpm: bool = True
    labels: tuple[str, ...] = ()
    transient: bool = False
    console_log: Path | None = None
    # --log-dir: the console to DIR/console.txt, the journal over virtio-serial
    log_dir: LogDir | None = None
    firmware_log: bool = False  # OVMF's debug port, logged beside the console
    start: bool = True
    ssh_wait: bool = False
    timeout: float = SSH_TIMEOUT
    # $BCVK_BOOT_STALL_TIMEOUT: a first boot silent this long in the kernel is restarted
    boot_stall: float = field(default_factory=stall.limit)
    pool: str = "default"
    accel: Accel | None = None
    project: lx.Project | None = None  # made by `bcvk up` from this file


def share_specs(
    binds: Sequence[str] = (), binds_ro: Sequence[str] = (), volumes: Sequence[str] = ()
) -> list[tuple[ShareKind, str]]:
    return [
        *((ShareKind.bind, b) for b in binds),
        *((ShareKind.bind_ro, b) for b in binds_ro),
        *((ShareKind.volume, v) for v in volumes),
    ]


def validate(opts: RunOptions) -> None:
    """The checks that need neither libvirt nor the image (run before connecting)."""
    if opts.name is not None:
        validate_vm_name(opts.name)
    for label in opts.labels:
        validate_label(label)
    resources(opts.memory, opts.vcpus, opts.itype)
    if opts.network is Network.none and (opts.ports or opts.ssh_wait):
        what = "-p/--port" if opts.ports else "--ssh/--ssh-wait"
        raise UsageError(
            f"--network none leaves the VM without a NIC, so {what} cannot work",
            hint="use --network user (the default) for SSH and port forwards",
        )
    # The base disk is to-disk's (installer auto): it decides what it can boot
    # (check_firmware, once the image is known), and with the user's keys its
    # boot chain is signed for a Secure Boot VM.
    if opts.secure_boot_keys is not None:
        if opts.firmware is not Firmware.uefi_secure:
            raise UsageError(
                f"--secure-boot-keys needs --firmware uefi-secure, not {opts.firmware.value}",
                hint="drop --firmware: with --secure-boot-keys it is uefi-secure",
            )
    else:
        to_disk.check_firmware(opts.firmware, to_disk.Installer.auto)
    to_disk.check_disk_size(opts.disk_size, opts.filesystem)
    if opts.log_dir is not None and opts.log_dir.console and opts.console_log is not None:
        raise UsageError(
            "--console-log and --log-dir console=DIR both name the console's log",
            hint="give one: --log-dir journal=DIR keeps --console-log FILE",
        )
    if opts.virtiofsd is not None and not (
        opts.virtiofsd.is_file() and os.access(opts.virtiofsd, os.X_OK)
    ):
        raise NotFoundError(
            f"--virtiofsd {opts.virtiofsd} is not an executable file",
            hint="give the path of virtiofsd (Debian 13+/Fedora: /usr/libexec/virtiofsd)",
        )
    if opts.ssh_key is not None:
        public = opts.ssh_key.with_name(opts.ssh_key.name + ".pub")
        if not opts.ssh_key.is_file() or not public.is_file():
            raise NotFoundError(
                f"--ssh-key {opts.ssh_key} needs the private key and {public.name} beside it",
                hint="create a pair with ssh-keygen -t ed25519 -f FILE",
            )


# ------------------------------------------------------------------ stages


@dataclass(frozen=True)
class Resolved:
    """Stage 1: the request against libvirt's current state; nothing created yet."""

    name: str
    image: str
    info: podman.ImageInfo
    memory_mib: int
    vcpus: int
    itype: str | None
    ssh_port: int
    domain_type: str


def domain_type(conn: Connection, override: Accel | None) -> str:
    """'kvm' where KVM really runs guests, else 'qemu' (TCG)."""
    from bcvk.host import accel, qemu

    choice = override or os.environ.get("BCVK_ACCEL")
    if choice:
        return "kvm" if accel.decide("", override=choice).accel == "kvm" else "qemu"
    if conn.info.driver == "test":
        return "test"
    if conn.info.local_host:
        return "kvm" if accel.decide(os.fspath(qemu.find_qemu())).accel == "kvm" else "qemu"
    caps = conn.capabilities()
    return "kvm" if "<domain type='kvm'" in caps.replace('"', "'") else "qemu"


def _check_ports(opts: RunOptions, taken: set[int], check_local: bool) -> None:
    seen: set[int] = set()
    for fwd in opts.ports:
        if fwd.host in seen:
            raise UsageError(
                f"host port {fwd.host} is forwarded twice", hint="use one -p per host port"
            )
        seen.add(fwd.host)
        if fwd.host in taken or (check_local and not port_bindable(fwd.host)):
            raise BcvkError(
                f"host port {fwd.host} is already in use",
                hint="pick another HOST port for -p HOST:GUEST "
                "(`bcvk libvirt list --all --format json` shows the ports VMs hold)",
            )


def image_info(image: str) -> podman.ImageInfo:
    ref = podman.validate_reference(image.removeprefix("containers-storage:"))
    return podman.local_image(ref, bootc=True)


def resolve(conn: Connection, image: str, opts: RunOptions) -> Resolved:
    memory_mib, vcpus, itype = resources(opts.memory, opts.vcpus, opts.itype)
    info = image_info(image)
    existing = all_vms(conn)
    taken_names = {d.name for d in conn.domains()}
    if opts.name:
        name = opts.name
        if name in taken_names:
            if not opts.replace:
                raise BcvkError(
                    f"a domain named {name!r} already exists",
                    hint="pass --replace to remove it first, or choose another --name",
                )
            if not any(v.name == name for v in existing):
                raise BcvkError(
                    f"refusing to replace domain {name!r}: bcvk did not create it",
                    hint="choose another --name",
                )
            logger.info("Replacing existing VM %s", name)
            lifecycle.remove(conn, name, force=True)
            existing = [v for v in existing if v.name != name]
    else:
        name = derive_name(image, taken_names)
    local = not conn.info.remote
    taken = used_ports(existing)
    _check_ports(opts, taken, check_local=local)
    ssh_port = (
        pick_ssh_port(taken | {p.host for p in opts.ports}, check_local=local)
        if opts.network is Network.user
        else 0
    )
    return Resolved(
        name, image, info, memory_mib, vcpus, itype, ssh_port, domain_type(conn, opts.accel)
    )


def base_disk(conn: Connection, image: str, opts: RunOptions) -> basedisks.BaseDisk:
    """Stage 2: the shared base disk of IMAGE with these install options."""
    pool = conn.ensure_pool(opts.pool)
    install = install_options(
        opts.disk_size, opts.filesystem, opts.root_size, opts.kargs, opts.secure_boot_keys
    )
    return basedisks.ensure(conn, pool, image, install)


def install_options(
    disk_size: int, filesystem: to_disk.Filesystem | None, root_size: int | None,
    kargs: Sequence[str], keys: secureboot.Keys | None = None,
) -> basedisks.InstallOptions:  # fmt: skip
    """A base disk's to-disk choices (bcvk's serial console, then the user's
    kargs; signed with KEYS when given)."""
    return basedisks.InstallOptions(
        disk_size, filesystem, root_size, (*DEFAULT_KARGS, *kargs), keys
    )


def secure_boot(conn: Connection, opts: RunOptions) -> tuple[str | None, str | None]:
    """The OVMF code and the enrolled variable store of a Secure Boot VM
    (None, None for any other)."""
    if opts.secure_boot_keys is None:
        return None, None
    if conn.info.remote:
        raise UsageError(
            "--secure-boot-keys works with a local libvirt only: the enrolled OVMF "
            "variables are made on this host",
            hint="build the signed disk with `bcvk to-disk --secure-boot-keys` and upload it",
        )
    fw = secureboot.secure_firmware()
    template = secureboot.enrolled_template(opts.secure_boot_keys, fw)
    return os.fspath(fw.code), os.fspath(template)


@dataclass(frozen=True)
class Shared:
    """Stage 3: the virtiofs devices and how the guest mounts them."""

    filesystems: tuple[lx.Filesystem, ...] = ()
    enforcement: lx.Enforcement | None = None
    by_credentials: bool = False  # systemd ≥ 256 mounts them at boot


def check_firmware(req: Resolved, opts: RunOptions) -> None:
    """Whether the base disk to-disk makes of the image boots OPTS' firmware:
    only the bootc installer's disks boot BIOS, and which installer ``auto``
    is depends on the image (read only when the firmware needs it: a mount)."""
    if opts.firmware in (Firmware.uefi, Firmware.uefi_secure):
        return
    has_bootc = _has_bootc(req.info.id)
    to_disk.check_picked_firmware(opts.firmware, to_disk.Installer.auto, has_bootc, req.image)


def _has_bootc(image_id: str) -> bool:
    from bcvk.image.inspect import probe_tree

    return probe_tree(image_id).has_bootc


def _guest_systemd(image: str) -> int | None:
    from bcvk.image.inspect import probe_tree

    try:
        return probe_tree(image).systemd_version
    except BcvkError as exc:
        logger.debug("could not read the image's systemd version: %s", exc)
        return None


def shares(
    conn: Connection, image: str, found: Sequence[Share], explicit: Path | None = None
) -> Shared:
    """The virtiofs devices for FOUND, served by EXPLICIT (--virtiofsd) or the one
    bcvk finds."""
    if not found:
        return Shared()
    local = not conn.info.remote
    real = virtiofsd.find(os.fspath(explicit) if explicit else None) if local else None
    mode = readonly_mode(conn.lib_version(), local, real is not None)
    wrapper: Path | None = None
    if real is not None and any(s.readonly for s in found) and mode is lx.Enforcement.host:
        # One wrapper per virtiofsd: rewriting a shared one would change other VMs'.
        suffix = "" if explicit is None else "-" + hashlib.sha256(bytes(real)).hexdigest()[:12]
        wrapper = paths.ensure_private_dir(paths.data_dir()) / f"virtiofsd-readonly{suffix}"
        text = readonly_wrapper_text(real)
        if not wrapper.exists() or wrapper.read_text() != text:
            paths.write_atomic(wrapper, text, 0o700)
    devices: list[lx.Filesystem] = []
    for share in found:
        binary = os.fspath(real) if real is not None else None
        if share.readonly and wrapper is not None:
            binary = os.fspath(wrapper)
        devices.append(
            lx.Filesystem(
                source=share.source,
                tag=share.tag,
                binary=binary,
                readonly=share.readonly and mode is lx.Enforcement.libvirt,
            )
        )
    enforcement = mode if any(s.readonly for s in found) else None
    systemd = _guest_systemd(image)
    by_credentials = (systemd or 0) >= MOUNT_CREDENTIALS_MIN_SYSTEMD
    return Shared(tuple(devices), enforcement, by_credentials)


def ssh_key(opts: RunOptions, name: str, vm_uuid: str, undo: Undo) -> tuple[Path, bool]:
    """Stage 4: the VM's key pair (generated in a 0700 directory), and whether bcvk made it."""
    if opts.ssh_key is not None:
        return opts.ssh_key.resolve(), False
    paths.ensure_private_dir(paths.data_dir())
    paths.ensure_private_dir(paths.data_dir() / "libvirt")
    directory = key_dir(vm_uuid)
    undo.note("key", vm_uuid)
    undo.push("removing the SSH key", lambda: shutil.rmtree(directory, True))
    return ssh.generate_key(directory, comment=f"bcvk-{name}").private, True


def log_files(opts: RunOptions, undo: Undo) -> None:
    """Stage 4b: --log-dir's directory (only its last level is made).  A run that
    fails takes back the files it started there and the directory it made."""
    if opts.log_dir is None:
        return
    directory = opts.log_dir.directory
    firmware = [directory / FIRMWARE_LOG_FILE] if opts.firmware_log else []
    wanted = [*opts.log_dir.files(), *firmware]
    fresh = [path for path in wanted if not path.exists()]
    made = not directory.exists()
    if made:
        directory.mkdir()

    def take_back() -> None:
        for path in fresh:
            path.unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):  # not empty: something else wrote there
                directory.rmdir()

    undo.push("removing the --log-dir files", take_back)


def vm_disk(
    conn: Connection, opts: RunOptions, name: str, base: basedisks.BaseDisk, undo: Undo
) -> tuple[str, str | None]:
    """Stage 5: (disk path, volume name): a qcow2 overlay on the base disk.

    Transient VMs use the base disk directly, with a QEMU-side overlay that
    vanishes with them.
    """
    if opts.transient:
        return base.path, None
    pool = conn.ensure_pool(opts.pool)
    volume = f"{name}.qcow2"
    if pool.volume(volume) is not None:
        raise BcvkError(
            f"volume {volume} already exists in pool {pool.name}",
            hint=f"remove it (virsh vol-delete --pool {pool.name} {volume}) "
            "or choose another --name",
        )
    undo.note("volume", pool.name, volume)
    with step(f"Creating disk {volume} backed by {base.volume}"):
        vol = pool.create_volume(basedisks.overlay_xml(volume, base.capacity, base.path), volume)
    undo.push(f"deleting volume {volume}", vol.delete)
    return vol.path, volume


def _have_swtpm(conn: Connection) -> bool:
    if conn.info.driver == "test":
        return True
    if conn.info.remote:
        return True  # the remote host decides; libvirt reports a clear error
    return shutil.which("swtpm") is not None


@dataclass(frozen=True)
class Made:
    """What stages 4 and 5 produced, for the domain XML."""

    vm_uuid: str
    private_key: Path
    generated_key: bool
    disk_path: str
    disk_volume: str | None
    pool: str


def domain_spec(
    conn: Connection, opts: RunOptions, req: Resolved, base: basedisks.BaseDisk,
    shared: Shared, made: Made,
) -> lx.DomainSpec:  # fmt: skip
    """Stage 6: the domain, as a pure spec (its metadata is bcvk's only record)."""
    public_key = made.private_key.with_name(made.private_key.name + ".pub").read_text().strip()
    creds = [
        credentials.smbios_value(
            credentials.TMPFILES_CREDENTIAL, credentials.tmpfiles_authorized_key(public_key)
        )
    ]
    if shared.by_credentials:
        creds += [credentials.smbios_value(n, c) for n, c in mounts.mount_credentials(opts.shares)]
    console_log = (
        os.fspath(opts.console_log.resolve())
        if opts.console_log
        else os.fspath(opts.log_dir.console_file)
        if opts.log_dir and opts.log_dir.console
        else default_console_log(conn.info, req.name)
    )
    metadata = lx.Metadata(
        source_image=req.image,
        image_digest=req.info.digest or req.info.id,
        ssh_port=req.ssh_port or None,
        ssh_private_key_path=os.fspath(made.private_key),
        ssh_generated=made.generated_key,
        memory_mb=req.memory_mib,
        vcpus=req.vcpus,
        disk_size_gb=opts.disk_size // GIB,
        filesystem=opts.filesystem.value if opts.filesystem else None,
        instance_type=req.itype,
        labels=opts.labels,
        firmware=opts.firmware.value,
        ports=opts.ports,
        mounts=opts.shares,
        readonly_enforcement=shared.enforcement.value if shared.enforcement else None,
        base_disk=base.volume,
        disk_volume=made.disk_volume,
        pool=made.pool,
        cache_hash=base.cache_hash,
        console_log=console_log,
        tpm=opts.tpm and _have_swtpm(conn),
        transient=opts.transient,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        created_by=f"bcvk {__version__}",
        domain_name=req.name,
        domain_uuid=made.vm_uuid,
        project=opts.project,
    )
    loader, template = secure_boot(conn, opts)
    return lx.DomainSpec(
        name=req.name,
        uuid=made.vm_uuid,
        loader=loader,
        nvram_template=template,
        memory_mib=req.memory_mib,
        vcpus=req.vcpus,
        disk_path=made.disk_path,
        domain_type=req.domain_type,
        firmware=opts.firmware,
        ssh_port=req.ssh_port,  # 0: no NIC (--network none)
        ports=opts.ports,
        filesystems=shared.filesystems,
        credentials=tuple(creds),
        tpm=metadata.tpm,
        console_log=console_log,
        firmware_log=lx.FirmwareLog(firmware_log_file(conn, opts, req.name))
        if opts.firmware_log
        else None,
        channels=tuple(
            lx.Channel(port, os.fspath(path))
            for port, path in (opts.log_dir.journal_ports() if opts.log_dir else ())
        ),
        transient_disk=opts.transient,
        metadata=metadata,
    )


def firmware_log_file(conn: Connection, opts: RunOptions, name: str) -> str | None:
    """Where --firmware-log is logged: DIR/firmware.txt with --log-dir, else
    beside the default console log (None on a remote host: the pty only)."""
    if opts.log_dir is not None:
        return os.fspath(opts.log_dir.directory / FIRMWARE_LOG_FILE)
    return default_log(conn.info, name, "firmware")


def define_and_start(conn: Connection, opts: RunOptions, xml: str, undo: Undo) -> DomainRef:
    """Stage 7: the domain in libvirt (started unless asked not to)."""
    domain = lx.Domain.from_xml(xml)
    name = domain.name
    undo.note("domain", domain.uuid)
    if opts.transient:
        with step(f"Starting transient VM {name}"):
            dom = conn.create_transient(xml)
        undo.push(f"stopping {name}", lambda: lifecycle.destroy_quietly(dom))
        return dom
    dom = conn.define(xml)
    undo.push(f"undefining {name}", lambda: lifecycle.undefine_quietly(dom))
    if opts.start:
        with step(f"Starting VM {name}"):
            dom.start()
        undo.push(f"stopping {name}", lambda: lifecycle.destroy_quietly(dom))
    return dom


def create_vm(conn: Connection, image: str, opts: RunOptions, within: Undo | None = None) -> Vm:
    """Stages 1-8; all or nothing, as part of the transaction WITHIN if given."""
    validate(opts)
    req = resolve(conn, image, opts)
    check_firmware(req, opts)
    base = base_disk(conn, image, opts)
    shared = shares(conn, image, opts.shares, opts.virtiofsd)
    with contextlib.nullcontext(within) if within is not None else transaction(conn) as undo:
        vm_uuid = str(uuidlib.uuid4())
        private, generated = ssh_key(opts, req.name, vm_uuid, undo)
        log_files(opts, undo)
        disk_path, volume = vm_disk(conn, opts, req.name, base, undo)
        made = Made(vm_uuid, private, generated, disk_path, volume, opts.pool)
        spec = domain_spec(conn, opts, req, base, shared, made)
        dom = define_and_start(conn, opts, lx.build(spec).to_xml(), undo)
        vm = read_vm(conn, dom)
        assert vm is not None
        booted = opts.start or opts.transient
        ssh_mounts = bool(opts.shares) and not shared.by_credentials and booted
        # mounted at boot, but podman's storage.conf is still edited over SSH
        ssh_storage = shared.by_credentials and booted and lifecycle.has_host_storage(opts.shares)
        if opts.ssh_wait or ssh_mounts or ssh_storage:
            if (ssh_mounts or ssh_storage) and not opts.ssh_wait:
                logger.info("Waiting for SSH to mount the shared directories in the guest…")
            lifecycle.wait_for_ssh(
                dom,
                vm,
                opts.timeout,
                # the log is this host's file only on a local connection
                boot_stall=0 if conn.info.remote else opts.boot_stall,
                # nothing has run in it yet; a transient domain would be gone
                restart=not opts.transient,
            )
            if ssh_mounts:
                lifecycle.apply_guest_mounts(vm)
            elif ssh_storage:
                lifecycle.apply_host_storage(vm)
    logger.info("VM %s is %s (ssh: bcvk libvirt ssh %s)", req.name, vm.state, req.name)
    return vm
