"""``bcvk pb``: podman-bootc's commands on bcvk's libvirt layer, and their Python API.

A pb VM is an ordinary bcvk libvirt domain whose bcvk metadata carries one
more element, ``<bootc:podman-bootc id=… name=… image-id=… …/>``.  libvirt is
the single source of truth: ``list`` reads the domains, there is no side
registry that could drift.

Identity, as in podman-bootc: without ``--name`` there is one VM per image;
its ID is the first 12 hex digits of the image ID and its domain is
``podman-bootc-<ID>``.  ``--name NAME`` creates an additional VM whose
domain is NAME, with an ID of its own.  Every command takes an ID, a unique
ID prefix or a name.

Locking, as in podman-bootc: a ``run``/``ssh`` session holds a shared
``flock`` on ``<runtime dir>/pb/<ID>.lock`` for as long as it lasts;
``stop`` and ``rm`` need an exclusive one, so they refuse while a session is
open (even with ``-f``).  A lock dies with its process: a crashed bcvk never
blocks anything.

Python API::

    from bcvk import pb
    vm = pb.run("localhost/bcvk/debian-bootc:12")          # like `pb run -B`
    print(pb.ssh(vm.id, ["cat", "/etc/os-release"]).stdout)
    pb.stop(vm.id); pb.start(vm.id); pb.rm(vm.id, force=True)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bcvk import run as proc
from bcvk.errors import BcvkError, NotFoundError, UsageError
from bcvk.host import podman
from bcvk.host import ssh as sshlib
from bcvk.lazy import Lazy
from bcvk.log import logger, step
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
    effective_uri,
    find,
    image_vm_id,
    key_credential,
    latest,
    new_id,
    patch_domain_xml,
    pb_info_from_xml,
    resolve,
)
from bcvk.pb.session import (
    ConsoleFollower,
    InUseError,
    VmLock,
    _in_use_error,
    _mux_options,
    _ssh_argv,
    close_masters,
    control_path,
    ensure_master,
    in_use,
    lock_path,
    locked_inodes,
    shared_connection,
)
from bcvk.values import MIB

# The Python API: what `from bcvk import pb` offers (the CLI and tests use these).
__all__ = [
    "DEFAULT_CPUS",
    "DEFAULT_MEMORY",
    "DOMAIN_PREFIX",
    "InUseError",
    "Launched",
    "PbInfo",
    "PbVm",
    "RunOptions",
    "VmLock",
    "control_path",
    "default_disk_size",
    "domain_name",
    "effective_uri",
    "find",
    "image_vm_id",
    "images",
    "in_use",
    "inspect",
    "key_credential",
    "latest",
    "launch",
    "list_vms",
    "lock_path",
    "locked_inodes",
    "new_id",
    "patch_domain_xml",
    "pb_info_from_xml",
    "resolve",
    "rm",
    "rm_all",
    "run",
    "run_session",
    "shared_connection",
    "ssh",
    "ssh_session",
    "start",
    "stop",
    "validate",
]

if TYPE_CHECKING:
    from bcvk.libvirt import basedisks, domains
    from bcvk.libvirt import connection as _connection
    from bcvk.libvirt import vms as vmview
    from bcvk.libvirt import xml as lx
    from bcvk.libvirt.connection import Connection
else:
    # `pb ssh` on a running VM must not pay for the libvirt layer's imports.
    basedisks = Lazy("bcvk.libvirt.basedisks")
    domains = Lazy("bcvk.libvirt.domains")
    vmview = Lazy("bcvk.libvirt.vms")
    lx = Lazy("bcvk.libvirt.xml")
    _connection = Lazy("bcvk.libvirt.connection")


# ------------------------------------------------------------------ listing


def _pb_vms(conn: Connection, *, with_use: bool = False) -> list[PbVm]:
    locks: set[tuple[int, int, int]] | None = None
    if with_use:
        try:
            locks = locked_inodes(Path("/proc/locks").read_text())
        except OSError:
            locks = set()
    found: list[PbVm] = []
    for dom in conn.domains():
        try:
            xml_text = dom.xml()
            info = pb_info_from_xml(xml_text)
            if info is None:
                continue
            vm = vmview.vm_from_xml(
                xml_text,
                dom.state(),
                dom.is_persistent(),
                conn.requested_uri,
                conn.info.ssh_jump,
                conn.info.ssh_proxy_command,
            )
        except _connection.DomainNotFound:
            continue
        if vm is None:
            continue
        busy = in_use(info.id, locks) if with_use else False
        found.append(PbVm(info, vm, busy))
    return sorted(found, key=lambda v: (v.created, v.id))


def list_vms(uri: str | None = None) -> list[PbVm]:
    """Every pb VM at URI, oldest first, with whether a session holds it."""
    with _connection.connect(uri) as conn:
        return _pb_vms(conn, with_use=True)


def inspect(ref: str, uri: str | None = None) -> PbVm:
    with _connection.connect(uri) as conn:
        return resolve(_pb_vms(conn, with_use=True), ref)


def images() -> list[object]:
    """bootc images in podman's store (``pb images``)."""
    from bcvk.image import inspect as core

    return list(core.list_bootc())


# ------------------------------------------------------------------ run


@dataclass(frozen=True)
class RunOptions:
    """``pb run``'s choices; sizes in bytes."""

    user: str = "root"
    cloudinit: Path | None = None
    filesystem: str | None = None
    root_size_max: int | None = None
    disk_size: int | None = None
    name: str | None = None
    memory: int = DEFAULT_MEMORY
    cpus: int = DEFAULT_CPUS
    ports: tuple[lx.PortForward, ...] = ()
    volumes: tuple[str, ...] = ()  # HOST:GUEST (libvirt's --bind)
    ssh_key: Path | None = None
    quiet: bool = True
    timeout: float = SSH_TIMEOUT
    pool: str | None = None  # default: "default" (system) / "podman-bootc" (session)


def validate(opts: RunOptions) -> None:
    """Checks that need no podman and no libvirt."""
    if not re.match(r"^[a-z_][a-z0-9_.-]{0,31}$", opts.user):
        raise UsageError(f"invalid user name {opts.user!r}")
    if opts.name is not None:
        vmview.validate_name(opts.name)
        if opts.name.startswith(DOMAIN_PREFIX):
            raise UsageError(
                f"--name {opts.name!r}: {DOMAIN_PREFIX}… names belong to the images' own VMs",
                hint="choose another name",
            )
    if opts.cloudinit is not None:
        from bcvk.guest import cloudinit

        cloudinit.check_dir(opts.cloudinit)
    for text in opts.volumes:
        vmview.parse_bind(text, lx.MountKind.bind)


def pool_name(conn: Connection, opts: RunOptions) -> str:
    """The pool holding pb disks: qemu:///session's under the podman-bootc cache dir."""
    if opts.pool:
        return opts.pool
    if conn.info.session and not conn.info.remote:
        _connection.ensure_dir_pool(conn, SESSION_POOL, disks_dir())
        return SESSION_POOL
    return SYSTEM_POOL


def disks_dir() -> Path:
    """``$XDG_CACHE_HOME/bootc-kit/podman-bootc/disks`` (qemu:///session's pool)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "bootc-kit" / "podman-bootc" / "disks"


@contextlib.contextmanager
def _install_log() -> Iterator[None]:
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
class _Identity:
    vm_id: str
    domain: str
    image: str | None  # None: an existing VM named by ID/name
    info: podman.ImageInfo | None
    existing: PbVm | None


def _identify(conn: Connection, ref: str, opts: RunOptions) -> _Identity:
    vms = _pb_vms(conn)
    if opts.name is None:
        vm = find(vms, ref) if _looks_like_vm_ref(ref) else None
        if vm is not None:
            return _Identity(vm.id, vm.name, None, None, vm)
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
        return _Identity(vm_id, domain_name(vm_id, None), image, info, existing)
    existing = next((v for v in vms if v.name == opts.name), None)
    vm_id = existing.id if existing else new_id({v.id for v in vms})
    return _Identity(vm_id, domain_name(vm_id, opts.name), image, info, existing)


def _looks_like_vm_ref(ref: str) -> bool:
    # An image reference with a registry, path or tag is never a VM reference.
    return "/" not in ref and ":" not in ref and "@" not in ref


def _check_reuse(vm: PbVm, ident: _Identity, opts: RunOptions, disk_size: int | None) -> None:
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


def _create(conn: Connection, ident: _Identity, opts: RunOptions) -> None:
    """Define the pb VM (not started): disk, key, metadata, optional seed ISO."""
    assert ident.image is not None
    assert ident.info is not None
    disk_size = default_disk_size(ident.info.size, opts.disk_size)
    pool = pool_name(conn, opts)
    lopts = domains.RunOptions(
        name=ident.domain,
        memory=opts.memory,
        vcpus=opts.cpus,
        disk_size=disk_size,
        filesystem=opts.filesystem,
        root_size=opts.root_size_max,
        ports=opts.ports,
        binds=opts.volumes,
        ssh_key=opts.ssh_key,
        start=False,
        ssh_wait=False,
        timeout=opts.timeout,
        pool=pool,
    )
    with _install_log():
        vm = domains.create_vm(conn, ident.image, lopts)
    seed_volume = None
    try:
        seed = None
        if opts.cloudinit is not None:
            seed_volume = _seed_volume(conn, pool, ident.vm_id, opts.cloudinit)
            seed = seed_volume[1]
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
            filesystem=opts.filesystem,
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
    except BaseException:
        with contextlib.suppress(BcvkError):
            domains.remove(conn, ident.domain, force=True)
        if seed_volume is not None:
            _delete_volume(conn, pool, seed_volume[0])
        raise


def _seed_volume(conn: Connection, pool_name_: str, vm_id: str, source: Path) -> tuple[str, str]:
    """Build the NoCloud seed ISO into the pool (where QEMU can read it): (volume, path)."""
    from bcvk.guest import cloudinit

    pool = conn.ensure_pool(pool_name_)
    name = f"{DOMAIN_PREFIX}{vm_id}-cidata.iso"
    directory = basedisks.pool_writable(conn, pool)
    with step("Building the cloud-init seed ISO"):
        if directory is not None:
            path = cloudinit.build_seed(
                source, directory / name, instance_id=f"pb-{vm_id}", hostname=f"pb-{vm_id}"
            )
            pool.refresh()
            return name, os.fspath(path)
        with basedisks._scratch_dir() as tmp:
            iso = cloudinit.build_seed(
                source, tmp / name, instance_id=f"pb-{vm_id}", hostname=f"pb-{vm_id}"
            )
            volume = basedisks.upload_file(pool, iso, name, "raw")
            return name, volume.path


def _delete_volume(conn: Connection, pool_name_: str, name: str) -> None:
    pool = conn.pool(pool_name_)
    if pool is None:
        return
    with contextlib.suppress(BcvkError):
        pool.refresh()
        volume = pool.volume(name)
        if volume is not None:
            volume.delete()


def _get(conn: Connection, vm_id: str) -> PbVm:
    vm = next((v for v in _pb_vms(conn) if v.id == vm_id), None)
    if vm is None:
        raise NotFoundError(f"VM {vm_id} disappeared", hint="`bcvk pb list` shows what is left")
    return vm


def _boot(conn: Connection, vm: PbVm, opts: RunOptions) -> PbVm:
    """Start VM (when stopped), wait for SSH, mount shares; returns the fresh view."""
    dom = conn.get(vm.name)
    close_masters(vm.id)
    log = vm.vm.metadata.console_log
    if log and not conn.info.remote:
        # qemu:///session does not create ~/.cache/libvirt/qemu/log itself.
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    stream = None if opts.quiet else sys.stderr
    with ConsoleFollower(vm.vm.metadata.console_log if stream else None, stream or sys.stderr):
        if not dom.is_active():
            with step(f"Starting VM {vm.id} ({vm.name})"):
                dom.start()
        fresh = _get(conn, vm.id)
        domains.wait_for_ssh(dom, fresh.vm, opts.timeout)
    mounts = fresh.vm.metadata.mounts
    oem = lx.Domain.from_xml(dom.xml()).oem_strings
    if mounts and not any("systemd.extra-unit" in s for s in oem):
        domains.apply_guest_mounts(fresh.vm)
    return fresh


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
    with _connection.connect(uri) as conn:
        ident = _identify(conn, ref, opts)
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
                _check_reuse(existing, ident, opts, disk)
                vm = existing
            else:
                _create(conn, ident, opts)
                created = True
                vm = _get(conn, ident.vm_id)
            try:
                vm = _boot(conn, vm, opts)
                started = True
            except BaseException:
                if created:
                    logger.info("Removing VM %s, which did not come up", ident.vm_id)
                    with contextlib.suppress(BcvkError):
                        _remove(conn, _get(conn, ident.vm_id))
                else:
                    with contextlib.suppress(BcvkError):
                        domains.stop_domain(conn.get(vm.name), force=True)
                raise
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
        status = _session(vm, command, user=None)
        if not (rm or command):
            return vm, status
        if not launched.lock.try_exclusive():
            logger.warning("another session of VM %s is open; leaving it running", vm.id)
            return vm, status
        with _connection.connect(uri) as conn:
            if rm or launched.created:
                _remove(conn, _get(conn, vm.id), keep_base=True)
            else:
                _stop(conn, _get(conn, vm.id))
        return vm, status


def _session(vm: PbVm, command: Sequence[str], *, user: str | None, capture: bool = False) -> int:
    tty = True if not command and sys.stdin.isatty() else None
    argv = _ssh_argv(vm, command, user=user, tty=tty, share=True)
    result = proc.run(argv, check=False, capture=capture, stdout=1, stdin=0)
    return int(result.returncode)


# ------------------------------------------------------------------ ssh


def _running(conn: Connection, ref: str | None) -> PbVm:
    vms = _pb_vms(conn)
    vm = resolve(vms, ref) if ref else latest(vms)
    if not vm.running:
        raise BcvkError(
            f"VM {vm.id} ({vm.name}) is not running (state: {vm.vm.state})",
            hint=f"start it with `bcvk pb start {vm.id}`",
        )
    return vm


def _fast_argv(
    ref: str | None, command: Sequence[str], user: str | None, uri: str | None, tty: bool | None
) -> tuple[str, list[str]] | None:
    """(ID, ssh argv) through a live shared connection, or None to ask libvirt."""
    found = shared_connection(ref, user, uri)
    if found is None:
        return None
    vm_id, port, login, path = found
    # The key is never read: the master holds the authenticated connection.
    target = sshlib.Target(port=port, key=Path(os.devnull), user=login)
    return vm_id, sshlib.argv(target, command, tty=tty, extra=_mux_options(path))


def ssh_session(
    ref: str | None, command: Sequence[str] = (), *, user: str | None = None, uri: str | None = None
) -> int:
    """``pb ssh``: a session (or COMMAND) in a running VM, holding its session lock."""
    tty = True if not command and sys.stdin.isatty() else None
    fast = _fast_argv(ref, command, user, uri, tty)
    if fast is not None:
        vm_id, argv = fast
        with VmLock(vm_id) as lock:
            lock.shared()
            return int(proc.run(argv, check=False, capture=False, stdout=1, stdin=0).returncode)
    with _connection.connect(uri) as conn:
        vm = _running(conn, ref)
    with VmLock(vm.id) as lock:
        lock.shared()
        return _session(vm, command, user=user)


def ssh(
    ref: str | None,
    command: Sequence[str],
    *,
    user: str | None = None,
    uri: str | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run COMMAND in VM REF and capture its output (never raises on its exit status)."""
    fast = _fast_argv(ref, command, user, uri, False)
    if fast is not None:
        vm_id, argv = fast
    else:
        with _connection.connect(uri) as conn:
            vm = _running(conn, ref)
        vm_id = vm.id
        argv = _ssh_argv(vm, command, user=user, tty=False, share=True)
    with VmLock(vm_id) as lock:
        lock.shared()
        return proc.run(argv, check=False, timeout=timeout)


# ------------------------------------------------------------------ start / stop / rm


def start(
    ref: str,
    *,
    uri: str | None = None,
    wait: bool = True,
    quiet: bool = True,
    timeout: float = SSH_TIMEOUT,
) -> PbVm:
    with _connection.connect(uri) as conn:
        vm = resolve(_pb_vms(conn), ref)
        if vm.running:
            logger.info("VM %s is already running", vm.id)
            return vm
        if not wait:
            close_masters(vm.id)
            conn.get(vm.name).start()
            return _get(conn, vm.id)
        return _boot(conn, vm, RunOptions(quiet=quiet, timeout=timeout))


def _stop(conn: Connection, vm: PbVm) -> None:
    close_masters(vm.id)
    domains.stop_domain(conn.get(vm.name))


def stop(ref: str, *, uri: str | None = None) -> PbVm:
    """Shut the VM down; its domain and disk stay (unlike podman-bootc)."""
    with _connection.connect(uri) as conn:
        vm = resolve(_pb_vms(conn), ref)
        with VmLock(vm.id) as lock:
            if not lock.try_exclusive():
                raise _in_use_error(vm.id, vm.name, "stop")
            _stop(conn, vm)
        return _get(conn, vm.id)


def _remove(conn: Connection, vm: PbVm, *, keep_base: bool = False) -> None:
    """Domain, its disk and key, seed ISO, shared SSH connections, and an unused base disk
    (unless KEEP_BASE: `run --rm` and COMMAND runs keep it cached for the next run)."""
    close_masters(vm.id)
    md = vm.vm.metadata
    domains.remove(conn, vm.name, force=True)
    pool_name_ = md.pool or SYSTEM_POOL
    if vm.info.cloudinit_iso:
        _delete_volume(conn, pool_name_, Path(vm.info.cloudinit_iso).name)
    if not keep_base and md.base_disk and basedisks.is_base_name(md.base_disk):
        _delete_unused_base(conn, pool_name_, md.base_disk)
    with contextlib.suppress(OSError):
        lock_path(vm.id).unlink()


def _delete_unused_base(conn: Connection, pool_name_: str, base: str) -> None:
    """podman-bootc's rm frees the disk: drop the base disk once nothing uses it."""
    pool = conn.pool(pool_name_)
    if pool is None:
        return
    pool.refresh()
    infos = [v.info() for v in pool.volumes()]
    refs = basedisks.references(infos, basedisks.domain_disk_paths(conn))
    path = next((i.path for i in infos if i.name == base), None)
    if path is None or refs.get(path):
        return
    volume = pool.volume(base)
    if volume is not None:
        logger.info("Deleting disk %s (no VM uses it any more)", base)
        volume.delete()


def rm(ref: str, *, force: bool = False, uri: str | None = None) -> PbVm:
    """Remove VM REF; a running one only with FORCE; never one with an open session."""
    with _connection.connect(uri) as conn:
        vm = resolve(_pb_vms(conn), ref)
        with VmLock(vm.id) as lock:
            if not lock.try_exclusive():
                raise _in_use_error(vm.id, vm.name, "remove")
            if vm.running and not force:
                raise BcvkError(
                    f"VM {vm.id} ({vm.name}) is running",
                    hint=f"stop it first (`bcvk pb stop {vm.id}`) or pass -f to stop it",
                )
            with step(f"Removing VM {vm.id} ({vm.name})"):
                _remove(conn, vm)
        return vm


def rm_all(*, force: bool = False, uri: str | None = None) -> tuple[list[PbVm], list[PbVm]]:
    """Remove every pb VM that is stopped (running ones too with FORCE), skipping those in use.

    Returns (removed, skipped).
    """
    removed: list[PbVm] = []
    skipped: list[PbVm] = []
    with _connection.connect(uri) as conn:
        for vm in _pb_vms(conn):
            with VmLock(vm.id) as lock:
                if not lock.try_exclusive():
                    logger.warning("Skipping VM %s (%s): an SSH session is open", vm.id, vm.name)
                    skipped.append(vm)
                    continue
                if vm.running and not force:
                    logger.warning("Skipping running VM %s (%s); -f removes it", vm.id, vm.name)
                    skipped.append(vm)
                    continue
                try:
                    _remove(conn, vm)
                except _connection.DomainNotFound:
                    continue
                logger.info("Removed VM %s (%s)", vm.id, vm.name)
                removed.append(vm)
    return removed, skipped


__all__ = [
    "InUseError",
    "PbInfo",
    "PbVm",
    "RunOptions",
    "images",
    "inspect",
    "launch",
    "list_vms",
    "rm",
    "rm_all",
    "run",
    "run_session",
    "ssh",
    "ssh_session",
    "start",
    "stop",
]
