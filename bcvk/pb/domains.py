"""pb VMs among libvirt's domains: finding them, booting, stopping and removing one.

A pb VM is a bcvk libvirt domain whose metadata also holds the
``<bootc:podman-bootc>`` element; these functions take an open connection and
are shared by ``pb run`` (``bcvk.pb.launcher``) and the other pb verbs.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from bcvk.errors import BcvkError, NotFoundError
from bcvk.libvirt import basedisks, lifecycle
from bcvk.libvirt import xml as lx
from bcvk.libvirt.connection import Connection, DomainNotFound
from bcvk.libvirt.vms import vm_from_xml
from bcvk.log import step
from bcvk.pb.model import DOMAIN_PREFIX, SYSTEM_POOL, PbVm, pb_info_from_xml
from bcvk.pb.session import ConsoleFollower, close_masters, in_use, lock_path, locked_inodes


def pb_vms(conn: Connection, *, with_use: bool = False) -> list[PbVm]:
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
            vm = vm_from_xml(
                xml_text,
                dom.state(),
                dom.is_persistent(),
                conn.requested_uri,
                conn.info.ssh_jump,
                conn.info.ssh_proxy_command,
            )
        except DomainNotFound:
            continue
        if vm is None or vm.copied_from is not None:
            # A copy (virt-clone) shares the original's pb ID and key: not a pb VM.
            continue
        busy = in_use(info.id, locks) if with_use else False
        found.append(PbVm(info, vm, busy))
    return sorted(found, key=lambda v: (v.created, v.id))


def delete_volume(conn: Connection, pool_name_: str, name: str) -> None:
    pool = conn.pool(pool_name_)
    if pool is None:
        return
    with contextlib.suppress(BcvkError):
        pool.refresh()
        volume = pool.volume(name)
        if volume is not None:
            volume.delete()


def get(conn: Connection, vm_id: str) -> PbVm:
    vm = next((v for v in pb_vms(conn) if v.id == vm_id), None)
    if vm is None:
        raise NotFoundError(f"VM {vm_id} disappeared", hint="`bcvk pb list` shows what is left")
    return vm


def boot(conn: Connection, vm: PbVm, *, quiet: bool, timeout: float) -> PbVm:
    """Start VM (when stopped), wait for SSH, mount shares; returns the fresh view."""
    dom = conn.get(vm.name)
    close_masters(vm.id)
    log = vm.vm.console_log
    if log and not conn.info.remote:
        # qemu:///session does not create ~/.cache/libvirt/qemu/log itself.
        Path(log).parent.mkdir(parents=True, exist_ok=True)
    stream = None if quiet else sys.stderr
    with ConsoleFollower(vm.vm.console_log if stream else None, stream or sys.stderr):
        if not dom.is_active():
            with step(f"Starting VM {vm.id} ({vm.name})"):
                dom.start()
        fresh = get(conn, vm.id)
        lifecycle.wait_for_ssh(dom, fresh.vm, timeout)
    mounts = fresh.vm.metadata.mounts
    oem = lx.Domain.from_xml(dom.xml()).oem_strings
    if mounts and not any("systemd.extra-unit" in s for s in oem):
        lifecycle.apply_guest_mounts(fresh.vm)
    return fresh


def stop(conn: Connection, vm: PbVm) -> None:
    close_masters(vm.id)
    lifecycle.stop_domain(conn.get(vm.name))


def remove(conn: Connection, vm: PbVm, *, keep_base: bool = False) -> None:
    """Domain, its disk and key, seed ISO, shared SSH connections, and an unused base disk
    (unless KEEP_BASE: `run --rm` and COMMAND runs keep it cached for the next run)."""
    close_masters(vm.id)
    md = vm.vm.metadata
    lifecycle.remove(conn, vm.name, force=True)
    pool_name_ = md.pool or SYSTEM_POOL
    seed = seed_iso_of(vm)
    if seed is not None:
        volume = conn.volume_by_path(seed)
        if volume is not None and volume.name == seed_volume_name(vm.id):
            volume.delete()
    if not keep_base and md.base_disk and basedisks.is_base_name(md.base_disk):
        delete_unused_base(conn, pool_name_, md.base_disk)
    with contextlib.suppress(OSError):
        lock_path(vm.id).unlink()


def seed_volume_name(vm_id: str) -> str:
    return f"{DOMAIN_PREFIX}{vm_id}-cidata.iso"


def seed_iso_of(vm: PbVm) -> str | None:
    """The seed ISO bcvk made for VM: attached to it, and named for its ID."""
    for path in vm.vm.cdroms:
        if Path(path).name == seed_volume_name(vm.id):
            return path
    return None


def delete_unused_base(conn: Connection, pool_name_: str, base: str) -> None:
    """podman-bootc's rm frees the disk: drop the base disk once nothing uses it."""
    pool = conn.pool(pool_name_)
    if pool is not None:
        basedisks.delete_if_unused(conn, pool, base)
