"""``pb run``: find or create an image's VM, boot it, and open a session in it.

Stages: ``identify`` which VM (an existing one by ID or name, the image's
own, or a new ``--name``d one), ``check_reuse`` (podman-bootc #31: never a
disk built from other inputs), ``create`` (bcvk libvirt's provisioning with
pb's metadata patched in), then ``domains.boot`` and the session lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bcvk import run as proc
from bcvk import to_disk
from bcvk.errors import BcvkError, UsageError
from bcvk.guest import cloudinit, mounts
from bcvk.guest.mounts import Share, ShareKind
from bcvk.host import podman
from bcvk.libvirt import basedisks, lifecycle, pending, provision
from bcvk.libvirt import connection as libvirt_connection
from bcvk.libvirt.connection import Connection
from bcvk.log import logger, step
from bcvk.pb import domains
from bcvk.pb.model import (
    DEFAULT_CPUS,
    DEFAULT_MEMORY,
    DOMAIN_PREFIX,
    SESSION_POOL,
    SSH_TIMEOUT,
    SYSTEM_POOL,
    PbInfo,
    PbVm,
    default_disk_size,
    domain_name,
    find,
    image_vm_id,
    key_credential,
    new_id,
    patch_domain_xml,
)
from bcvk.pb.session import VmLock, ensure_master, ssh_argv
from bcvk.values import (
    MIB,
    PortForward,
    is_vm_name,
    parse_choice,
    parse_size,
    parse_timeout,
    parse_vcpus,
    unique_host_ports,
    validate_user,
    validate_vm_name,
)


def volumes_of(specs: Sequence[str], uri: str | None) -> tuple[Share, ...]:
    """``-v HOST:GUEST`` values, parsed as libvirt's ``--bind``."""
    from bcvk.libvirt.uri import default_uri, parse_uri

    local = not parse_uri(uri or default_uri()).remote
    return mounts.at_guest_paths([(ShareKind.bind, s) for s in specs], local=local)


@dataclass(frozen=True)
class RunOptions:
    """``pb run``'s choices; sizes in bytes."""

    user: str = "root"
    cloudinit: Path | None = None
    filesystem: to_disk.Filesystem | None = None
    root_size_max: int | None = None
    disk_size: int | None = None
    name: str | None = None
    memory: int = DEFAULT_MEMORY
    cpus: int = DEFAULT_CPUS
    ports: tuple[PortForward, ...] = ()
    volumes: tuple[Share, ...] = ()  # -v HOST:GUEST: libvirt's --bind
    ssh_key: Path | None = None
    quiet: bool = True
    timeout: float = SSH_TIMEOUT
    pool: str | None = None  # default: "default" (system) / "podman-bootc" (session)


def make_run_options(
    uri: str | None = None,
    *,
    filesystem: str | None = None,
    root_size_max: str | int | None = None,
    disk_size: str | int | None = None,
    memory: str | int | None = None,
    cpus: str | int | None = None,
    ports: Sequence[str] = (),
    volumes: Sequence[str] = (),
    cloudinit: str | os.PathLike[str] | None = None,
    ssh_key: str | os.PathLike[str] | None = None,
    timeout: float | str = SSH_TIMEOUT,
    **rest: Any,
) -> RunOptions:
    """CLI-shaped values → ``RunOptions``: the one parser of ``pb run``'s options."""

    def size(value: str | int | None, what: str, unit: str = "") -> int | None:
        if value is None or isinstance(value, int):
            return value
        return parse_size(value, default_unit=unit, what=what)

    return RunOptions(
        filesystem=parse_choice(to_disk.Filesystem, filesystem, "--filesystem")
        if filesystem
        else None,
        root_size_max=size(root_size_max, "--root-size-max"),
        disk_size=size(disk_size, "--disk-size"),
        memory=size(memory, "--memory", "m") or DEFAULT_MEMORY,
        cpus=parse_vcpus(cpus, "--cpus") if cpus is not None else DEFAULT_CPUS,
        ports=unique_host_ports(tuple(PortForward.parse(p) for p in ports)),
        volumes=volumes_of(volumes, uri),
        cloudinit=Path(cloudinit) if cloudinit is not None else None,
        ssh_key=Path(ssh_key) if ssh_key is not None else None,
        timeout=parse_timeout(timeout, "--timeout"),
        **rest,
    )


def validate(opts: RunOptions) -> None:
    """Checks that need no podman and no libvirt."""
    validate_user(opts.user)
    if opts.name is not None:
        validate_vm_name(opts.name)
        if opts.name.startswith(DOMAIN_PREFIX):
            raise UsageError(
                f"--name {opts.name!r}: {DOMAIN_PREFIX}… names belong to the images' own VMs",
                hint="choose another name",
            )
    if opts.cloudinit is not None:
        cloudinit.check_dir(opts.cloudinit)


def pool_name(conn: Connection, opts: RunOptions) -> str:
    """The pool holding pb disks: qemu:///session's under the podman-bootc cache dir."""
    if opts.pool:
        return opts.pool
    if conn.info.session and not conn.info.remote:
        libvirt_connection.ensure_dir_pool(conn, SESSION_POOL, disks_dir())
        return SESSION_POOL
    return SYSTEM_POOL


def disks_dir() -> Path:
    """``$XDG_CACHE_HOME/bootc-kit/podman-bootc/disks`` (qemu:///session's pool)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "bootc-kit" / "podman-bootc" / "disks"


@contextlib.contextmanager
def install_log() -> Iterator[None]:
    """BOOTC_INSTALL_LOG set: the disk build logs every step and command it runs."""
    if not os.environ.get("BOOTC_INSTALL_LOG"):
        yield
        return
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class Identity:
    vm_id: str
    domain: str
    image: str | None  # None: an existing VM named by ID/name
    info: podman.ImageInfo | None
    existing: PbVm | None


def identify(conn: Connection, ref: str, opts: RunOptions) -> Identity:
    vms = domains.pb_vms(conn)
    if opts.name is None:
        vm = find(vms, ref) if looks_like_vm_ref(ref) else None
        if vm is not None:
            return Identity(vm.id, vm.name, None, None, vm)
    image = podman.validate_reference(ref.removeprefix("containers-storage:"))
    info = podman.ensure_image(image)  # pulls a missing image, as podman-bootc does
    if not info.is_bootc:
        raise BcvkError(
            f"image {image} is not a bootc image: it has no {podman.BOOTC_LABEL}=1 label",
            hint="build it FROM a bootc base image, or add LABEL containers.bootc=1",
        )
    if info.id.startswith(image.removeprefix("sha256:")) and info.names:
        image = info.names[0]  # named by image ID: record (and cache by) its tag
    if opts.name is None:
        vm_id = image_vm_id(info.id)
        existing = next((v for v in vms if v.id == vm_id), None)
        return Identity(vm_id, domain_name(vm_id, None), image, info, existing)
    existing = next((v for v in vms if v.name == opts.name), None)
    vm_id = existing.id if existing else new_id({v.id for v in vms})
    return Identity(vm_id, domain_name(vm_id, opts.name), image, info, existing)


def looks_like_vm_ref(ref: str) -> bool:
    # An image reference with a registry, path or tag is never a VM reference.
    return "/" not in ref and ":" not in ref and "@" not in ref


def check_reuse(vm: PbVm, ident: Identity, opts: RunOptions, disk_size: int | None) -> None:
    """Refuse to reuse a VM whose disk was built from other inputs (podman-bootc #31)."""
    problems = []
    if ident.info is not None and vm.info.image_id and ident.info.id != vm.info.image_id:
        problems.append("it was made from another version of the image")
    if disk_size is not None and disk_size != vm.info.disk_size:
        problems.append(f"its disk is {vm.info.disk_size // MIB} MiB, not {disk_size // MIB} MiB")
    if opts.filesystem is not None and opts.filesystem != vm.info.filesystem:
        problems.append(f"its root filesystem is {vm.info.filesystem or 'the image default'}")
    if opts.root_size_max is not None and opts.root_size_max != vm.info.root_size:
        problems.append("its root partition has another size")
    if problems:
        raise BcvkError(
            f"VM {vm.id} ({vm.name}) exists and " + "; ".join(problems),
            hint=f"remove it with `bcvk pb rm {vm.id}` to build a new disk, "
            "or run it without those options",
        )


def create(conn: Connection, ident: Identity, opts: RunOptions, undo: pending.Undo) -> None:
    """Define the pb VM (not started): disk, key, metadata, optional seed ISO.

    Part of UNDO's transaction: ``launch`` commits it once the VM has booted.
    """
    assert ident.image is not None
    assert ident.info is not None
    disk_size = default_disk_size(ident.info.size, opts.disk_size)
    pool = pool_name(conn, opts)
    lopts = provision.RunOptions(
        name=ident.domain,
        memory=opts.memory,
        vcpus=opts.cpus,
        disk_size=disk_size,
        filesystem=opts.filesystem,
        root_size=opts.root_size_max,
        ports=opts.ports,
        shares=opts.volumes,
        ssh_key=opts.ssh_key,
        start=False,
        ssh_wait=False,
        timeout=opts.timeout,
        pool=pool,
    )
    with install_log():
        vm = provision.create_vm(conn, ident.image, lopts, within=undo)
    seed = None
    if opts.cloudinit is not None:
        volume = domains.seed_volume_name(ident.vm_id)
        undo.note("volume", pool, volume)
        undo.push(f"deleting volume {volume}", lambda: domains.delete_volume(conn, pool, volume))
        seed = seed_volume(conn, pool, ident.vm_id, opts.cloudinit)[1]
    key = vm.metadata.ssh_private_key_path
    assert key is not None
    public = Path(key + ".pub").read_text().strip()
    info = PbInfo(
        id=ident.vm_id,
        name=opts.name,
        image_id=ident.info.id,
        repository=ident.image,
        user=opts.user,
        disk_size=disk_size,
        filesystem=opts.filesystem.value if opts.filesystem else None,
        root_size=opts.root_size_max,
        cloudinit_iso=seed,
    )
    dom = conn.get(ident.domain)
    patched = patch_domain_xml(
        dom.xml(inactive=True),
        info,
        seed_iso=seed,
        tmpfiles_credential=key_credential(public, opts.user) if opts.user != "root" else None,
    )
    conn.define(patched)


def seed_volume(conn: Connection, pool_name_: str, vm_id: str, source: Path) -> tuple[str, str]:
    """Build the NoCloud seed ISO into the pool (where QEMU can read it): (volume, path)."""
    pool = conn.ensure_pool(pool_name_)
    name = domains.seed_volume_name(vm_id)
    directory = basedisks.pool_writable(conn, pool)
    with step("Building the cloud-init seed ISO"):
        if directory is not None:
            path = cloudinit.build_seed(
                source, directory / name, instance_id=f"pb-{vm_id}", hostname=f"pb-{vm_id}"
            )
            pool.refresh()
            return name, os.fspath(path)
        with basedisks.scratch_dir() as tmp:
            iso = cloudinit.build_seed(
                source, tmp / name, instance_id=f"pb-{vm_id}", hostname=f"pb-{vm_id}"
            )
            volume = basedisks.upload_file(pool, iso, name, "raw")
            return name, volume.path


@dataclass
class Launched:
    """A pb VM made ready by `launch`, with the session lock held."""

    vm: PbVm
    created: bool  # this run defined it
    started: bool  # this run started it
    lock: VmLock
    uri: str | None


@contextlib.contextmanager
def launch(ref: str, opts: RunOptions, uri: str | None = None) -> Iterator[Launched]:
    """Find or create REF's VM, boot it, wait for SSH; hold its session lock in the block."""
    validate(opts)
    # REF is a VM's ID or name, or an image: one of the two before connecting.
    if opts.name is not None or not (looks_like_vm_ref(ref) and is_vm_name(ref)):
        podman.validate_reference(ref.removeprefix("containers-storage:"))
    with pending.connected(uri) as conn:
        ident = identify(conn, ref, opts)
        with VmLock(ident.vm_id) as lock:
            lock.shared()
            created = started = False
            existing = ident.existing
            if existing is not None:
                if existing.running:
                    raise BcvkError(
                        f"VM {existing.id} ({existing.name}) is already running",
                        hint=f"connect with `bcvk pb ssh {existing.id}`, "
                        f"or stop it with `bcvk pb stop {existing.id}`",
                    )
                disk = (
                    default_disk_size(ident.info.size, opts.disk_size)
                    if ident.info is not None and opts.disk_size is not None
                    else None
                )
                check_reuse(existing, ident, opts, disk)
                try:
                    vm = domains.boot(conn, existing, quiet=opts.quiet, timeout=opts.timeout)
                except BaseException:
                    with contextlib.suppress(BcvkError):
                        lifecycle.stop_domain(conn.get(existing.name), force=True)
                    raise
            else:
                # A VM that never came up (an error, a signal, SIGKILL) is undone.
                with pending.transaction(conn) as undo:
                    create(conn, ident, opts, undo)
                    created = True
                    vm = domains.get(conn, ident.vm_id)
                    vm = domains.boot(conn, vm, quiet=opts.quiet, timeout=opts.timeout)
            started = True
            ensure_master(vm.target(), vm.id, uri)
            logger.info("VM %s (%s) is ready: bcvk pb ssh %s", vm.id, vm.name, vm.id)
            yield Launched(vm, created, started, lock, uri)


def run(image: str, options: RunOptions | None = None, *, uri: str | None = None) -> PbVm:
    """Create (or start) IMAGE's VM and return once SSH works (``pb run -B``)."""
    with launch(image, options or RunOptions(), uri) as launched:
        return launched.vm


def run_session(
    ref: str,
    opts: RunOptions,
    command: Sequence[str] = (),
    *,
    rm: bool = False,
    background: bool = False,
    uri: str | None = None,
) -> tuple[PbVm, int]:
    """``pb run``: boot, then a session (or CMD); returns (VM, exit status).

    After a CMD, or with --rm, the VM is removed (a VM this run did not create
    is only stopped after a CMD, so its disk survives); its base disk stays
    cached.  Otherwise it keeps running.
    """
    if rm and background:
        raise UsageError(
            "--rm cannot be combined with -B/--background",
            hint="a background VM has no session whose end could remove it",
        )
    with launch(ref, opts, uri) as launched:
        vm = launched.vm
        if background:
            return vm, 0
        status = session(vm, command, user=None)
        if not (rm or command):
            return vm, status
        if not launched.lock.try_exclusive():
            logger.warning("another session of VM %s is open; leaving it running", vm.id)
            return vm, status
        with libvirt_connection.connect(uri) as conn:
            if rm or launched.created:
                domains.remove(conn, domains.get(conn, vm.id), keep_base=True)
            else:
                domains.stop(conn, domains.get(conn, vm.id))
        return vm, status


def session(vm: PbVm, command: Sequence[str], *, user: str | None, capture: bool = False) -> int:
    tty = True if not command and sys.stdin.isatty() else None
    argv = ssh_argv(vm, command, user=user, tty=tty, share=True)
    result = proc.run(argv, check=False, capture=capture, stdout=1, stdin=0)
    return int(result.returncode)
