"""Operations on bcvk's existing domains: wait for SSH, mount shares, stop, remove.

Everything here takes an open ``Connection`` (or a domain and its ``Vm``
view) and is shared by ``bcvk libvirt`` and ``bcvk pb``; the verbs that open
connections are in ``bcvk.libvirt.domains``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bcvk import paths
from bcvk.errors import BcvkError, NotFoundError, WaitTimeout
from bcvk.guest import mounts, stall
from bcvk.host import ssh
from bcvk.libvirt import basedisks
from bcvk.libvirt.connection import Connection, DomainNotFound, DomainRef, LibvirtError
from bcvk.libvirt.vms import Vm, default_log, get_vm, key_dir, qemu_dir
from bcvk.log import logger, step
from bcvk.wait import Deadline, wait_until

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SSH_TIMEOUT = 300.0  # TCG boots take a minute; leave room for a busy host
STOP_TIMEOUT = 60.0


def destroy_quietly(dom: DomainRef) -> None:
    with contextlib.suppress(DomainNotFound, LibvirtError):
        if dom.is_active():
            dom.destroy()


def undefine_quietly(dom: DomainRef) -> None:
    destroy_quietly(dom)
    with contextlib.suppress(DomainNotFound):
        dom.undefine()


def console_tail(vm: Vm, lines: int = 15) -> str:
    path = vm.console_log
    if not path:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    tail = [ln.rstrip() for ln in text.splitlines() if ln.strip()][-lines:]
    return "\n".join(tail)


def wait_for_ssh(
    dom: DomainRef,
    vm: Vm,
    timeout: float = SSH_TIMEOUT,
    *,
    boot_stall: float = 0,
    restart: bool = False,
) -> None:
    """Wait until a real SSH handshake + command succeeds, or the domain dies.

    BOOT_STALL: seconds of console silence in the kernel's boot that end the
    wait (``bcvk.guest.stall``; 0: not watched).  RESTART: such a boot is
    restarted once instead, for a domain that has just started for the first time.
    """
    target = vm.ssh_target()
    deadline = Deadline(timeout)
    log = Path(vm.console_log) if vm.console_log else None
    kernel = stall.watch(log, None, boot_stall) if log is not None else None
    restarted = False

    def ready() -> bool:
        nonlocal kernel, restarted
        if not dom.is_active():
            tail = console_tail(vm)
            raise BcvkError(
                f"VM {vm.name} stopped while waiting for SSH"
                + (f"; console:\n{tail}" if tail else ""),
                hint=f"see {vm.console_log or 'the libvirt log'} for the boot log",
            )
        if kernel is not None:
            try:
                kernel.check()
            except stall.KernelStalled as exc:
                if not restart or restarted or log is None:
                    raise
                logger.warning("%s; booting it again", exc)
                kernel = stall.follow(log, boot_stall)
                dom.destroy()
                dom.start()
                restarted = True
                return False
        return ssh.probe(target)

    with step(f"Waiting for SSH on port {target.port}"):
        try:
            wait_until(ready, deadline, f"SSH in VM {vm.name}", interval=1.0)
        except WaitTimeout as exc:
            tail = console_tail(vm)
            raise WaitTimeout(
                f"{exc.message}" + (f"; last console lines:\n{tail}" if tail else ""),
                hint="the image needs sshd enabled and DHCP networking; "
                f"console log: {vm.console_log or 'not recorded'}",
            ) from exc
    logger.info("SSH ready after %.1fs", deadline.elapsed)


def apply_guest_mounts(vm: Vm) -> None:
    """Mount binds over SSH and record them in the guest's /etc/fstab (with
    --bind-storage-ro, also make the host's store one of podman's)."""
    script = mounts.fstab_script(vm.metadata.mounts)
    if has_host_storage(vm.metadata.mounts):
        script += mounts.host_storage_setup() + "\n"
    _guest_setup(vm, script)


def has_host_storage(shares: Sequence[mounts.Share]) -> bool:
    return any(share.target == mounts.HOST_STORAGE for share in shares)


def apply_host_storage(vm: Vm) -> None:
    """--bind-storage-ro where systemd mounted the store at boot: podman's storage.conf."""
    _guest_setup(vm, mounts.host_storage_setup())


def _guest_setup(vm: Vm, script: str) -> None:
    result = ssh.execute(vm.ssh_target(), ["sh", "-c", script], timeout=120)
    if result.returncode != 0:
        raise BcvkError(
            f"mounting the shared directories in VM {vm.name} failed: "
            f"{(result.stderr or '').strip()[-300:]}",
            hint="the guest kernel needs virtiofs (CONFIG_VIRTIO_FS)",
        )


def running_vm(conn: Connection, name: str) -> tuple[DomainRef, Vm]:
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


def wait_inactive(dom: DomainRef, seconds: float) -> bool:
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
            if wait_inactive(dom, timeout):
                return
        logger.warning("VM %s did not shut down within %.0fs; forcing it off", dom.name, timeout)
        dom.destroy()
    except DomainNotFound:
        return


@dataclass(frozen=True)
class Removal:
    """What removing a VM deletes besides the domain: only what bcvk made for it."""

    name: str
    volume: str | None  # path of its own disk volume
    key_dir: str | None
    console_log: str | None
    firmware_log: str | None = None
    nvram: str | None = None  # a transient VM's variable store, which libvirt leaves


def own_key_dir(vm: Vm) -> Path | None:
    """bcvk's key directory for this domain's UUID, if bcvk generated its key."""
    if not vm.metadata.ssh_generated or not UUID_RE.fullmatch(vm.uuid):
        return None
    directory = key_dir(vm.uuid)
    managed = (paths.data_dir() / "libvirt").resolve()
    if not directory.is_dir() or directory.is_symlink():
        return None
    return directory if directory.resolve().parent == managed else None


def plan_removal(conn: Connection, vm: Vm) -> Removal:
    """Decided from the domain itself and bcvk's naming, never from metadata alone.

    A copy of a bcvk VM (virt-clone keeps the metadata) names the original's
    disk, key and log there; none of those is its own, so none is removed.
    """
    volume = None
    own_disk = f"{vm.name}.qcow2"
    for source in vm.disks:
        if Path(source).name == own_disk and not basedisks.is_base_name(own_disk):
            volume = source
    key = own_key_dir(vm)
    # Only the logs at bcvk's own default paths: a --console-log FILE is the user's.
    console, firmware = (
        path if path is not None and path == default_log(conn.info, vm.name, kind) else None
        for kind, path in (("console", vm.console_log), ("firmware", vm.firmware_log))
    )
    return Removal(
        vm.name,
        volume,
        os.fspath(key) if key else None,
        console,
        firmware,
        transient_nvram(conn, vm),
    )


def transient_nvram(conn: Connection, vm: Vm) -> str | None:
    """The UEFI variable store libvirt made for a transient bcvk VM, which it does
    not delete when the domain goes: only at libvirt's own path for this name."""
    base = qemu_dir(conn.info, ".config/libvirt/qemu/nvram", "/var/lib/libvirt/qemu/nvram")
    if vm.persistent or not vm.metadata.transient or base is None:
        return None
    return os.fspath(base / f"{vm.name}_VARS.fd")


def remove_transient_nvram(plan: Removal) -> None:
    if plan.nvram:
        with contextlib.suppress(OSError):
            Path(plan.nvram).unlink()


def remove(conn: Connection, name: str, *, force: bool = False) -> Removal:
    """Remove bcvk VM NAME: domain, NVRAM/TPM state, its disk, its generated key.

    With FORCE a running VM is stopped, and a copy of a bcvk VM is removed
    too (with only what is its own).
    """
    dom, vm = get_vm(conn, name, copies=force)
    if vm.running and not force:
        raise BcvkError(
            f"VM {name} is running",
            hint=f"stop it first (`bcvk libvirt stop {name}`) or pass -f/--force",
        )
    plan = plan_removal(conn, vm)
    with step(f"Removing VM {name}"):
        destroy_quietly(dom)
        if vm.persistent:
            with contextlib.suppress(DomainNotFound):
                dom.undefine()
        if plan.volume:
            volume = conn.volume_by_path(plan.volume)
            if volume is not None and volume.name == f"{name}.qcow2":
                volume.delete()
        if plan.key_dir:  # keys live on this machine even for remote URIs
            shutil.rmtree(plan.key_dir, ignore_errors=True)
        remove_transient_nvram(plan)
        for log in (plan.console_log, plan.firmware_log):
            if log and not conn.info.remote:
                with contextlib.suppress(OSError):
                    Path(log).unlink()
    return plan
