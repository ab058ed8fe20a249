"""Persistent VMs through libvirt: the core behind ``bcvk libvirt`` and its Python API.

libvirt is the single source of truth: everything bcvk needs later (image,
SSH port, key path, mounts, disks) is stored in the domain's ``<metadata>``;
there is no side registry.  A domain without bcvk's metadata is never
modified or removed.

Python API (mirrors the CLI)::

    from bcvk import libvirt
    vm = libvirt.run("localhost/bcvk/debian-bootc:12", name="t1", ssh_wait=True)
    print(libvirt.ssh("t1", ["cat", "/etc/os-release"]).stdout)
    libvirt.rm("t1", force=True)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bcvk import __version__, paths
from bcvk.errors import BcvkError, NotFoundError, UsageError, WaitTimeout
from bcvk.guest import credentials
from bcvk.host import podman, ssh, virtiofsd
from bcvk.libvirt import basedisks
from bcvk.libvirt import xml as lx
from bcvk.libvirt.connection import Connection, DomainNotFound, DomainRef, LibvirtError, connect
from bcvk.libvirt.vms import (
    Vm,
    _vm,
    all_vms,
    derive_name,
    filter_vms,
    get_vm,
    key_dir,
    parse_bind,
    pick_ssh_port,
    port_bindable,
    readonly_mode,
    readonly_wrapper_text,
    resources,
    used_ports,
    validate_label,
    validate_name,
)
from bcvk.log import logger, step
from bcvk.values import GIB
from bcvk.wait import Deadline, wait_until

DEFAULT_DISK_SIZE = 20 * GIB
SSH_TIMEOUT = 300.0  # TCG boots take a minute; leave room for a busy host
STOP_TIMEOUT = 60.0
# A serial console is only useful if the kernel writes to it; the user's
# --karg come after, so their own console= wins.
DEFAULT_KARGS = ("console=ttyS0",)
# systemd learnt systemd.extra-unit.* / unit-dropin credentials in 256.
MOUNT_CREDENTIALS_MIN_SYSTEMD = 256


# ------------------------------------------------------------------ run


@dataclass(frozen=True)
class RunOptions:
    name: str | None = None
    replace: bool = False
    memory: int | None = None  # bytes
    vcpus: int | None = None
    itype: str | None = None
    disk_size: int = DEFAULT_DISK_SIZE
    filesystem: str | None = None
    root_size: int | None = None
    kargs: tuple[str, ...] = ()
    ports: tuple[lx.PortForward, ...] = ()
    binds: tuple[str, ...] = ()  # HOST:GUEST
    binds_ro: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()  # HOST:TAG
    firmware: lx.Firmware = lx.Firmware.uefi
    ssh_key: Path | None = None
    tpm: bool = True
    labels: tuple[str, ...] = ()
    transient: bool = False
    console_log: Path | None = None
    start: bool = True
    ssh_wait: bool = False
    timeout: float = SSH_TIMEOUT
    pool: str = "default"
    accel: str | None = None


def build_mounts(opts: RunOptions, check_local: bool) -> tuple[lx.Mount, ...]:
    mounts: list[lx.Mount] = []
    counters = {k: 0 for k in lx.MountKind}
    groups = (
        (lx.MountKind.bind, opts.binds),
        (lx.MountKind.bind_ro, opts.binds_ro),
        (lx.MountKind.volume, opts.volumes),
    )
    for kind, specs in groups:
        for text in specs:
            host, target = parse_bind(text, kind)
            if check_local:
                host_path = Path(host).expanduser().resolve()
                if not host_path.is_dir():
                    raise NotFoundError(
                        f"host directory {host} does not exist",
                        hint="create it first, or fix the path before the ':'",
                    )
                host = os.fspath(host_path)
            elif not host.startswith("/"):
                raise UsageError(f"the host path {host!r} must be absolute for a remote URI")
            tag = target if kind is lx.MountKind.volume else f"bcvk-{kind.value}-{counters[kind]}"
            counters[kind] += 1
            mounts.append(lx.Mount(kind, host, target, tag))
    targets = [m.target for m in mounts if m.kind is not lx.MountKind.volume]
    if len(set(targets)) != len(targets):
        raise UsageError("two binds mount at the same guest path")
    return tuple(mounts)


def _check_ports(opts: RunOptions, taken: set[int], check_local: bool) -> None:
    seen: set[int] = set()
    for fwd in opts.ports:
        if fwd.host in seen:
            raise UsageError(f"host port {fwd.host} is forwarded twice")
        seen.add(fwd.host)
        if fwd.host in taken or (check_local and not port_bindable(fwd.host)):
            raise BcvkError(
                f"host port {fwd.host} is already in use",
                hint="pick another HOST port for -p HOST:GUEST "
                "(`bcvk libvirt list --all --format json` shows the ports VMs hold)",
            )


def _domain_type(conn: Connection, override: str | None) -> str:
    """'kvm' where KVM really runs guests, else 'qemu' (TCG)."""
    from bcvk.host import accel

    choice = override or os.environ.get("BCVK_ACCEL")
    if choice:
        return "kvm" if accel.decide("", override=choice).accel == "kvm" else "qemu"
    if conn.info.driver == "test":
        return "test"
    if conn.info.local_host:
        qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
        return "kvm" if accel.decide(qemu).accel == "kvm" else "qemu"
    caps = conn.capabilities()
    return "kvm" if "<domain type='kvm'" in caps.replace('"', "'") else "qemu"


def _check_firmware(firmware: lx.Firmware) -> None:
    if firmware is lx.Firmware.uefi_secure:
        raise UsageError(
            "--firmware uefi-secure needs a signed boot chain, and the disks bcvk builds "
            "boot an unsigned systemd-boot and kernel",
            hint="use --firmware uefi (OVMF with secure boot off, the default)",
        )
    if firmware is lx.Firmware.bios:
        from bcvk import to_disk
        from bcvk.to_disk.layout import Firmware as DiskFirmware

        # to-disk decides what it can build; its error explains why not.
        to_disk.validate(
            to_disk.Options(format=to_disk.DiskFormat.qcow2, firmware=DiskFirmware.bios),
            to_disk.DiskFormat.qcow2,
        )


def _image(image: str) -> podman.ImageInfo:
    ref = podman.validate_reference(image.removeprefix("containers-storage:"))
    return podman.local_image(ref, bootc=True)


def _guest_systemd(image: str) -> int | None:
    from bcvk.image import inspect as images

    try:
        return images.probe_tree(image).systemd_version
    except BcvkError as exc:
        logger.debug("could not read the image's systemd version: %s", exc)
        return None


def _default_console_log(conn: Connection, name: str) -> str | None:
    if conn.info.remote or conn.info.driver != "qemu":
        return None
    if conn.info.session:
        base = Path.home() / ".cache" / "libvirt" / "qemu" / "log"
    else:
        base = Path("/var/log/libvirt/qemu")
    return os.fspath(base / f"{name}-console.log")


def _filesystems(
    conn: Connection, mounts: Sequence[lx.Mount]
) -> tuple[tuple[lx.Filesystem, ...], str | None]:
    if not mounts:
        return (), None
    local = not conn.info.remote
    real = virtiofsd.find() if local else None
    mode = readonly_mode(conn.lib_version(), local, real is not None)
    wrapper: Path | None = None
    if real is not None and any(m.readonly for m in mounts) and mode == "host":
        wrapper = paths.ensure_private_dir(paths.data_dir()) / "virtiofsd-readonly"
        text = readonly_wrapper_text(real)
        if not wrapper.exists() or wrapper.read_text() != text:
            paths.write_atomic(wrapper, text, 0o700)
    filesystems: list[lx.Filesystem] = []
    for mount in mounts:
        binary = os.fspath(real) if real is not None else None
        if mount.readonly and wrapper is not None:
            binary = os.fspath(wrapper)
        filesystems.append(
            lx.Filesystem(
                source=mount.source,
                tag=mount.tag,
                binary=binary,
                readonly=mount.readonly and mode == "libvirt",
            )
        )
    ro_mode = mode if any(m.readonly for m in mounts) else None
    return tuple(filesystems), ro_mode


class _Undo:
    """Undo steps for a half-done run, executed in reverse unless committed."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self.steps.append((what, fn))

    def rollback(self) -> None:
        for what, fn in reversed(self.steps):
            try:
                fn()
            except Exception as exc:  # keep undoing the rest
                logger.warning("while cleaning up, %s failed: %s", what, exc)
        self.steps.clear()


@contextlib.contextmanager
def _rollback_on_error() -> Iterator[_Undo]:
    undo = _Undo()
    try:
        yield undo
    except BaseException:
        if undo.steps:
            logger.info("Removing what this run created…")
        undo.rollback()
        raise


def run(
    image: str, options: RunOptions | None = None, *, uri: str | None = None, **kwargs: object
) -> Vm:
    """Create (and by default start) a persistent VM of IMAGE; see ``bcvk libvirt run``."""
    opts = options or RunOptions(**kwargs)  # type: ignore[arg-type]
    if options is not None and kwargs:
        raise TypeError("pass either options or keyword arguments")
    with connect(uri) as conn:
        return create_vm(conn, image, opts)


def create_vm(conn: Connection, image: str, opts: RunOptions) -> Vm:
    memory_mib, vcpus, itype = resources(opts.memory, opts.vcpus, opts.itype)
    for label in opts.labels:
        validate_label(label)
    _check_firmware(opts.firmware)
    local = not conn.info.remote
    mounts = build_mounts(opts, check_local=local)
    if opts.ssh_key is not None:
        public = opts.ssh_key.with_name(opts.ssh_key.name + ".pub")
        if not opts.ssh_key.is_file() or not public.is_file():
            raise NotFoundError(
                f"--ssh-key {opts.ssh_key} needs the private key and {public.name} beside it",
                hint="create a pair with ssh-keygen -t ed25519 -f FILE",
            )
    info = _image(image)

    existing = all_vms(conn)
    taken_names = {d.name for d in conn.domains()}
    if opts.name:
        name = validate_name(opts.name)
        if name in taken_names:
            if not opts.replace:
                raise BcvkError(
                    f"a domain named {name!r} already exists",
                    hint="pass --replace to remove it first, or choose another --name",
                )
            old = next((v for v in existing if v.name == name), None)
            if old is None:
                raise BcvkError(
                    f"refusing to replace domain {name!r}: bcvk did not create it",
                    hint="choose another --name",
                )
            logger.info("Replacing existing VM %s", name)
            remove(conn, name, force=True)
            existing = [v for v in existing if v.name != name]
    else:
        name = derive_name(image, taken_names)

    taken_ports = used_ports(existing)
    _check_ports(opts, taken_ports, check_local=local)
    ssh_port = pick_ssh_port(taken_ports | {p.host for p in opts.ports}, check_local=local)
    domain_type = _domain_type(conn, opts.accel)
    pool = conn.ensure_pool(opts.pool)
    install = basedisks.InstallOptions(
        disk_size=opts.disk_size,
        filesystem=opts.filesystem,
        root_size=opts.root_size,
        kargs=(*DEFAULT_KARGS, *opts.kargs),
    )
    base = basedisks.ensure(conn, pool, image, info, install)

    systemd_version = _guest_systemd(image) if mounts else None
    use_mount_creds = (systemd_version or 0) >= MOUNT_CREDENTIALS_MIN_SYSTEMD
    filesystems, ro_mode = _filesystems(conn, mounts)

    vm_uuid = str(uuidlib.uuid4())
    with _rollback_on_error() as undo:
        # The key pair: generated per VM in a 0700 directory of the user.
        if opts.ssh_key is not None:
            private = opts.ssh_key.resolve()
            generated = False
        else:
            paths.ensure_private_dir(paths.data_dir())
            paths.ensure_private_dir(paths.data_dir() / "libvirt")
            directory = key_dir(vm_uuid)
            undo.push("removing the SSH key", lambda: shutil.rmtree(directory, True))
            private = ssh.generate_key(directory, comment=f"bcvk-{name}").private
            generated = True
        public_key = private.with_name(private.name + ".pub").read_text().strip()
        creds = [
            credentials.smbios_value(
                credentials.TMPFILES_CREDENTIAL, credentials.tmpfiles_authorized_key(public_key)
            )
        ]
        if use_mount_creds:
            creds += [lx.smbios_credential(n, c) for n, c in lx.mount_credentials(mounts)]

        # The disk: a qcow2 overlay on the base disk (transient VMs use the
        # base disk directly, with a QEMU-side overlay that vanishes with them).
        disk_volume: str | None = None
        if opts.transient:
            disk_path = base.path
        else:
            disk_volume = f"{name}.qcow2"
            if pool.volume(disk_volume) is not None:
                raise BcvkError(
                    f"volume {disk_volume} already exists in pool {pool.name}",
                    hint="remove it (virsh vol-delete --pool "
                    f"{pool.name} {disk_volume}) or choose another --name",
                )
            with step(f"Creating disk {disk_volume} backed by {base.volume}"):
                vol = pool.create_volume(
                    basedisks.overlay_xml(disk_volume, base.capacity, base.path), disk_volume
                )
            undo.push(f"deleting volume {disk_volume}", vol.delete)
            disk_path = vol.path

        console_log = (
            os.fspath(opts.console_log.resolve())
            if opts.console_log
            else _default_console_log(conn, name)
        )
        metadata = lx.Metadata(
            source_image=image,
            image_digest=info.digest or info.id,
            ssh_port=ssh_port,
            ssh_private_key_path=os.fspath(private),
            ssh_generated=generated,
            memory_mb=memory_mib,
            vcpus=vcpus,
            disk_size_gb=opts.disk_size // GIB,
            filesystem=opts.filesystem,
            instance_type=itype,
            labels=opts.labels,
            firmware=opts.firmware.value,
            ports=opts.ports,
            mounts=mounts,
            readonly_enforcement=ro_mode,
            base_disk=base.volume,
            disk_volume=disk_volume,
            pool=pool.name,
            cache_hash=base.cache_hash,
            console_log=console_log,
            tpm=opts.tpm and _have_swtpm(conn),
            transient=opts.transient,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            created_by=f"bcvk {__version__}",
        )
        spec = lx.DomainSpec(
            name=name,
            uuid=vm_uuid,
            memory_mib=memory_mib,
            vcpus=vcpus,
            disk_path=disk_path,
            domain_type=domain_type,
            firmware=opts.firmware,
            ssh_port=ssh_port,
            ports=opts.ports,
            filesystems=filesystems,
            credentials=tuple(creds),
            tpm=metadata.tpm,
            console_log=console_log,
            transient_disk=opts.transient,
            metadata=metadata,
        )
        domain_xml = lx.build(spec).to_xml()
        if opts.transient:
            with step(f"Starting transient VM {name}"):
                dom = conn.create_transient(domain_xml)
            undo.push(f"stopping {name}", lambda: _destroy_quietly(dom))
        else:
            dom = conn.define(domain_xml)
            undo.push(f"undefining {name}", lambda: _undefine_quietly(dom))
            if opts.start:
                with step(f"Starting VM {name}"):
                    dom.start()
                undo.push(f"stopping {name}", lambda: _destroy_quietly(dom))
        vm = _vm(conn, dom)
        assert vm is not None
        needs_ssh_mounts = bool(mounts) and not use_mount_creds and (opts.start or opts.transient)
        if opts.ssh_wait or needs_ssh_mounts:
            if needs_ssh_mounts and not opts.ssh_wait:
                logger.info("Waiting for SSH to mount the shared directories in the guest…")
            wait_for_ssh(dom, vm, opts.timeout)
            if needs_ssh_mounts:
                apply_guest_mounts(vm)
        undo.steps.clear()  # committed
    logger.info("VM %s is %s (ssh: bcvk libvirt ssh %s)", name, vm.state, name)
    return vm


def _have_swtpm(conn: Connection) -> bool:
    if conn.info.driver == "test":
        return True
    if conn.info.remote:
        return True  # the remote host decides; libvirt reports a clear error
    return shutil.which("swtpm") is not None


def _destroy_quietly(dom: DomainRef) -> None:
    with contextlib.suppress(DomainNotFound, LibvirtError):
        if dom.is_active():
            dom.destroy()


def _undefine_quietly(dom: DomainRef) -> None:
    _destroy_quietly(dom)
    with contextlib.suppress(DomainNotFound):
        dom.undefine()


def console_tail(vm: Vm, lines: int = 15) -> str:
    path = vm.metadata.console_log
    if not path:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    tail = [ln.rstrip() for ln in text.splitlines() if ln.strip()][-lines:]
    return "\n".join(tail)


def wait_for_ssh(dom: DomainRef, vm: Vm, timeout: float = SSH_TIMEOUT) -> None:
    """Wait until a real SSH handshake + command succeeds, or the domain dies."""
    target = vm.ssh_target()
    deadline = Deadline(timeout)

    def ready() -> bool:
        if not dom.is_active():
            tail = console_tail(vm)
            raise BcvkError(
                f"VM {vm.name} stopped while waiting for SSH"
                + (f"; console:\n{tail}" if tail else ""),
                hint=f"see {vm.metadata.console_log or 'the libvirt log'} for the boot log",
            )
        return ssh.probe(target)

    with step(f"Waiting for SSH on port {target.port}"):
        try:
            wait_until(ready, deadline, f"SSH in VM {vm.name}", interval=1.0)
        except WaitTimeout as exc:
            tail = console_tail(vm)
            raise WaitTimeout(
                f"{exc.message}" + (f"; last console lines:\n{tail}" if tail else ""),
                hint="the image needs sshd enabled and DHCP networking; "
                f"console log: {vm.metadata.console_log or 'not recorded'}",
            ) from exc
    logger.info("SSH ready after %.1fs", deadline.elapsed)


def apply_guest_mounts(vm: Vm) -> None:
    """Mount binds over SSH and record them in the guest's /etc/fstab."""
    script = lx.guest_mount_script(vm.metadata.mounts)
    result = ssh.execute(vm.ssh_target(), ["sh", "-c", script], timeout=120)
    if result.returncode != 0:
        raise BcvkError(
            f"mounting the shared directories in VM {vm.name} failed: "
            f"{(result.stderr or '').strip()[-300:]}",
            hint="the guest kernel needs virtiofs (CONFIG_VIRTIO_FS)",
        )


# ------------------------------------------------------------------ other verbs


def list_vms(
    uri: str | None = None, *, all_states: bool = False, label: str | None = None
) -> list[Vm]:
    with connect(uri) as conn:
        return filter_vms(all_vms(conn), all_states=all_states, label=label)


def inspect(name: str, uri: str | None = None) -> Vm:
    with connect(uri) as conn:
        return get_vm(conn, name)[1]


def domain_xml(name: str, uri: str | None = None) -> str:
    with connect(uri) as conn:
        dom, _ = get_vm(conn, name)
        return dom.xml()


def _running_vm(conn: Connection, name: str) -> tuple[DomainRef, Vm]:
    dom, vm = get_vm(conn, name)
    if not vm.running:
        raise BcvkError(
            f"VM {name} is not running (state: {vm.state})",
            hint=f"start it with `bcvk libvirt start {name}`",
        )
    key = vm.metadata.ssh_private_key_path
    if key and not Path(key).is_file():
        raise NotFoundError(
            f"the SSH key of VM {name} ({key}) is missing",
            hint="keys stay on the machine that created the VM; recreate it with --replace",
        )
    return dom, vm


def ssh_command(
    name: str,
    command: Sequence[str] = (),
    *,
    uri: str | None = None,
    capture: bool = True,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run COMMAND in VM NAME over SSH (waiting up to TIMEOUT for sshd); never raises on
    the command's exit status."""
    with connect(uri) as conn:
        dom, vm = _running_vm(conn, name)
        target = vm.ssh_target()
        if not ssh.probe(target):
            wait_for_ssh(dom, vm, timeout)
    return ssh.execute(target, list(command), capture=capture)


def ssh_interactive(
    name: str, command: Sequence[str] = (), *, uri: str | None = None, timeout: float = 60.0
) -> int:
    with connect(uri) as conn:
        dom, vm = _running_vm(conn, name)
        target = vm.ssh_target()
        if not ssh.probe(target):
            wait_for_ssh(dom, vm, timeout)
    return ssh.interactive(target, list(command))


def start(
    name: str, *, uri: str | None = None, ssh_wait: bool = False, timeout: float = SSH_TIMEOUT
) -> Vm:
    with connect(uri) as conn:
        dom, vm = get_vm(conn, name)
        if vm.running:
            logger.info("VM %s is already running", name)
        else:
            with step(f"Starting VM {name}"):
                dom.start()
            vm = _vm(conn, dom) or vm
        if ssh_wait:
            wait_for_ssh(dom, vm, timeout)
        return vm


def _wait_inactive(dom: DomainRef, seconds: float) -> bool:
    def stopped() -> bool:
        try:
            return not dom.is_active()
        except DomainNotFound:
            return True  # a transient domain vanishes when it stops

    try:
        wait_until(stopped, Deadline(seconds), f"VM {dom.name} to stop", interval=0.25)
    except WaitTimeout:
        return False
    return True


def stop_domain(dom: DomainRef, *, force: bool = False, timeout: float = STOP_TIMEOUT) -> None:
    try:
        if not dom.is_active():
            logger.info("VM %s is not running", dom.name)
            return
        if force:
            dom.destroy()
            return
        with step(f"Shutting down VM {dom.name}"):
            dom.shutdown()
            if _wait_inactive(dom, timeout):
                return
        logger.warning("VM %s did not shut down within %.0fs; forcing it off", dom.name, timeout)
        dom.destroy()
    except DomainNotFound:
        return


def stop(
    name: str, *, uri: str | None = None, force: bool = False, timeout: float = STOP_TIMEOUT
) -> None:
    with connect(uri) as conn:
        dom, vm = get_vm(conn, name)
        stop_domain(dom, force=force, timeout=timeout)
        if not vm.persistent:
            # A transient domain is gone once stopped: so is its generated key.
            key = plan_removal(vm).key_dir
            if key:
                shutil.rmtree(key, ignore_errors=True)


@dataclass(frozen=True)
class Removal:
    name: str
    volume: str | None
    key_dir: str | None
    console_log: str | None
    notes: list[str] = field(default_factory=list)


def plan_removal(vm: Vm) -> Removal:
    md = vm.metadata
    key = None
    if md.ssh_generated and md.ssh_private_key_path:
        parent = Path(md.ssh_private_key_path).parent
        managed = paths.data_dir() / "libvirt"
        if parent.parent == managed:
            key = os.fspath(parent)
    log = None
    if md.console_log and md.console_log.endswith(f"/{vm.name}-console.log"):
        log = md.console_log
    volume = (
        md.disk_volume if md.disk_volume and not basedisks.is_base_name(md.disk_volume) else None
    )
    return Removal(vm.name, volume, key, log)


def remove(conn: Connection, name: str, *, force: bool = False) -> Removal:
    """Remove bcvk VM NAME: domain, NVRAM/TPM state, its disk, its generated key."""
    dom, vm = get_vm(conn, name)
    if vm.running and not force:
        raise BcvkError(
            f"VM {name} is running",
            hint=f"stop it first (`bcvk libvirt stop {name}`) or pass -f/--force",
        )
    plan = plan_removal(vm)
    with step(f"Removing VM {name}"):
        _destroy_quietly(dom)
        if vm.persistent:
            with contextlib.suppress(DomainNotFound):
                dom.undefine()
        if plan.volume:
            pool = conn.pool(vm.metadata.pool or "default")
            volume = pool.volume(plan.volume) if pool is not None else None
            if volume is not None:
                volume.delete()
        if plan.key_dir:  # keys live on this machine even for remote URIs
            shutil.rmtree(plan.key_dir, ignore_errors=True)
        if plan.console_log and not conn.info.remote:
            with contextlib.suppress(OSError):
                Path(plan.console_log).unlink()
    return plan


def rm(name: str, *, uri: str | None = None, force: bool = False) -> Removal:
    with connect(uri) as conn:
        return remove(conn, name, force=force)


def rm_all(
    *, uri: str | None = None, force: bool = False, label: str | None = None
) -> tuple[list[str], list[str]]:
    """Remove every bcvk VM (with LABEL); running ones only with FORCE.

    Returns (removed, skipped) names.
    """
    removed: list[str] = []
    skipped: list[str] = []
    with connect(uri) as conn:
        for vm in filter_vms(all_vms(conn), all_states=True, label=label):
            if vm.running and not force:
                skipped.append(vm.name)
                continue
            try:
                remove(conn, vm.name, force=force)
            except DomainNotFound:
                continue
            removed.append(vm.name)
    return removed, skipped


# ------------------------------------------------------------------ status


def status(uri: str | None = None) -> dict[str, object]:
    with connect(uri) as conn:
        lib = conn.lib_version()
        hyp = conn.hypervisor_version()
        vms = all_vms(conn)
        local = not conn.info.remote
        real = virtiofsd.find() if local else None
        arch = os.uname().machine
        virttype = _domain_type(conn, None)
        domcaps = conn.domain_capabilities(arch, lx.machine_for(arch), virttype) or ""
        pool = conn.pool("default")
        pool_path = None
        base_count = 0
        if pool is not None and pool.active():
            pool_path = os.fspath(pool.path())
            base_count = sum(1 for v in pool.volumes() if basedisks.is_base_name(v.name))
        ro = readonly_mode(lib, local, real is not None)
        return {
            "uri": conn.uri,
            "libvirt_version": ".".join(map(str, lib)),
            "hypervisor": conn.hypervisor_type(),
            "hypervisor_version": ".".join(map(str, hyp)) if hyp else None,
            "domain_type": virttype,
            "supports_readonly_virtiofs": lib >= (11, 0, 0),
            "readonly_bind_enforcement": ro,
            "readonly_bind_enforcement_detail": {
                "libvirt": "<readonly/> on the virtiofs share (libvirt ≥ 11)",
                "host": "virtiofsd --readonly via a <binary> wrapper (host-enforced)",
                "guest": "mounted with -o ro inside the guest (guest-enforced)",
            }[ro],
            "virtiofs": "virtiofs" in domcaps if domcaps else None,
            "virtiofsd": os.fspath(real) if real else None,
            "uefi_firmware": "efi" in domcaps if domcaps else None,
            "tpm_emulator": ("emulator" in domcaps if domcaps else None)
            if not local
            else shutil.which("swtpm") is not None,
            "default_pool": pool_path,
            "base_disks": base_count,
            "domain_count": len(vms),
            "running_domain_count": sum(1 for v in vms if v.running),
        }


# ------------------------------------------------------------------ upload


def default_volume_name(image: str, digest: str, fmt: str) -> str:
    last = image.rsplit("/", 1)[-1]
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", last).strip("-") or "bootc"
    short = digest.split(":", 1)[-1][:12]
    return f"bootc-{safe}-{short}.{fmt}"


def upload(
    image: str,
    *,
    uri: str | None = None,
    pool: str = "default",
    volume_name: str | None = None,
    disk_size: int = DEFAULT_DISK_SIZE,
    filesystem: str | None = None,
    root_size: int | None = None,
    kargs: Sequence[str] = (),
    replace: bool = False,
) -> str:
    """Build IMAGE's disk locally and stream it into POOL; returns the volume's path."""
    info = _image(image)
    install = basedisks.InstallOptions(disk_size, filesystem, root_size, tuple(kargs))
    name = volume_name or default_volume_name(image, info.digest or info.id, "qcow2")
    if "/" in name or not name:
        raise UsageError(f"invalid volume name {name!r}")
    with connect(uri) as conn:
        target_pool = conn.ensure_pool(pool)
        target_pool.refresh()
        existing = target_pool.volume(name)
        if existing is not None:
            if not replace:
                raise BcvkError(
                    f"volume {name} already exists in pool {target_pool.name}",
                    hint="pass --replace to overwrite it, or choose --volume-name",
                )
            existing.delete()
        start_time = time.monotonic()
        with basedisks._scratch_dir() as tmp:
            output = tmp / name
            basedisks.build_local(image, output, install)
            volume = basedisks.upload_file(target_pool, output, name, "qcow2")
        logger.info(
            "Uploaded %s to pool %s in %.1fs", name, target_pool.name, time.monotonic() - start_time
        )
        return volume.path


# ------------------------------------------------------------------ base disks


def base_disks(uri: str | None = None, pool: str = "default") -> list[basedisks.BaseDiskInfo]:
    with connect(uri) as conn:
        target = conn.pool(pool)
        if target is None:
            return []
        return basedisks.list_base_disks(conn, target)


def prune_base_disks(
    uri: str | None = None, pool: str = "default", dry_run: bool = False
) -> list[basedisks.BaseDiskInfo]:
    with connect(uri) as conn:
        target = conn.pool(pool)
        if target is None:
            return []
        return basedisks.prune(conn, target, dry_run=dry_run)
