"""Persistent VMs through libvirt: the verbs behind ``bcvk libvirt`` and its Python API.

libvirt is the single source of truth: everything bcvk needs later (image,
SSH port, key path, mounts, disks) is stored in the domain's ``<metadata>``;
there is no side registry.  A domain without bcvk's metadata is never
modified or removed.  Each verb opens its own connection; the work on an
open one is in ``bcvk.libvirt.create`` and ``bcvk.libvirt.lifecycle``.

Python API (mirrors the CLI)::

    from bcvk import libvirt
    vm = libvirt.run("localhost/bcvk/debian-bootc:12", name="t1", ssh_wait=True)
    print(libvirt.ssh("t1", ["cat", "/etc/os-release"]).stdout)
    libvirt.rm("t1", force=True)
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bcvk import to_disk
from bcvk.errors import BcvkError, NotFoundError, UsageError
from bcvk.guest import mounts
from bcvk.guest.logdir import parse_log_dir
from bcvk.host import podman, secureboot, ssh, virtiofsd
from bcvk.libvirt import basedisks, lifecycle
from bcvk.libvirt import xml as lx
from bcvk.libvirt.connection import DomainNotFound
from bcvk.libvirt.lifecycle import SSH_TIMEOUT, STOP_TIMEOUT, Removal, plan_removal, remove
from bcvk.libvirt.pending import connected
from bcvk.libvirt.provision import (
    DEFAULT_DISK_SIZE,
    RunOptions,
    create_vm,
    domain_type,
    image_info,
    install_options,
    share_specs,
    validate,
)
from bcvk.libvirt.uri import default_uri, parse_uri
from bcvk.libvirt.vms import Vm, all_vms, filter_vms, get_vm, read_vm, readonly_mode
from bcvk.log import logger, step
from bcvk.values import (
    Accel,
    Firmware,
    Network,
    PortForward,
    parse_choice,
    parse_karg,
    parse_size,
    parse_timeout,
    validate_label,
    validate_vm_name,
)


def make_run_options(uri: str | None = None, **values: Any) -> RunOptions:
    """CLI-shaped values (``memory="4G"``, ``binds=["/src:/srv"]``, ``ports=["8080:80"]``)
    → ``RunOptions``: the one parser of ``bcvk libvirt run``'s options."""
    local = not parse_uri(uri or default_uri()).remote
    memory = values.pop("memory", None)
    disk_size = values.pop("disk_size", None)
    root_size = values.pop("root_size", None)
    filesystem = values.pop("filesystem", None)
    firmware = values.pop("firmware", Firmware.uefi)
    accel = values.pop("accel", None)
    network = values.pop("network", Network.user)
    virtiofsd_path = values.pop("virtiofsd", None)
    keys = values.pop("secure_boot_keys", None)
    log_dir = values.pop("log_dir", None)
    if isinstance(log_dir, str):
        if not local:
            raise UsageError(
                "--log-dir writes files on this machine, and the VM runs on a remote host",
                hint="use --console-log with a path on the remote host",
            )
        log_dir = parse_log_dir(log_dir)
    if keys is not None and firmware in (Firmware.uefi, "uefi"):
        firmware = Firmware.uefi_secure  # the keys say it: Secure Boot
    specs = share_specs(
        values.pop("binds", ()), values.pop("binds_ro", ()), values.pop("volumes", ())
    )
    storage = _host_storage(values.pop("bind_storage_ro", False), local)
    return RunOptions(
        memory=parse_size(memory, default_unit="m", what="--memory")
        if isinstance(memory, str)
        else memory,
        disk_size=parse_size(disk_size, what="--disk-size")
        if isinstance(disk_size, str)
        else disk_size or DEFAULT_DISK_SIZE,
        root_size=parse_size(root_size, default_unit="m", what="--root-size")
        if isinstance(root_size, str)
        else root_size,
        filesystem=parse_choice(to_disk.Filesystem, filesystem, "--filesystem")
        if filesystem
        else None,
        firmware=parse_choice(
            Firmware, "uefi" if firmware == "uefi-insecure" else firmware, "--firmware"
        ),  # fmt: skip
        accel=parse_choice(Accel, accel, "--accel") if accel else None,
        network=_network(network),
        virtiofsd=Path(virtiofsd_path) if virtiofsd_path else None,
        secure_boot_keys=secureboot.load_keys(keys) if keys is not None else None,
        log_dir=log_dir,
        ports=tuple(
            p if isinstance(p, PortForward) else PortForward.parse(p)
            for p in values.pop("ports", ())
        ),  # fmt: skip
        shares=(*mounts.at_guest_paths(specs, local=local), *storage),
        kargs=tuple(parse_karg(k) for k in values.pop("kargs", ())),
        labels=tuple(validate_label(label) for label in values.pop("labels", ())),
        timeout=parse_timeout(values.pop("timeout", SSH_TIMEOUT), "--timeout"),
        **values,
    )


def _host_storage(wanted: bool, local: bool) -> tuple[mounts.Share, ...]:
    """--bind-storage-ro: this user's podman store, read-only, at upstream's path."""
    if not wanted:
        return ()
    if not local:
        raise UsageError(
            "--bind-storage-ro shares this machine's container storage, and the VM runs "
            "on a remote host",
            hint="run bcvk on the VM's host, or copy the image there",
        )
    store = podman.graph_root()
    if not store.is_dir():
        raise NotFoundError(
            f"--bind-storage-ro: the container storage {store} does not exist",
            hint="pull or build an image with podman first",
        )
    return (mounts.host_storage(store),)


def _network(value: str | Network) -> Network:
    if value == "bridge" or str(value).startswith("bridge="):
        raise UsageError(
            "--network bridge is not supported: bcvk cannot test a bridge on its own hosts",
            hint="use --network user (the default) with -p HOST:GUEST forwards on 127.0.0.1",
        )
    return parse_choice(Network, value, "--network")


def run(image: str, options: RunOptions | None = None, *, uri: str | None = None,
        **values: Any) -> Vm:  # fmt: skip
    """Create (and by default start) a persistent VM of IMAGE; see ``bcvk libvirt run``.

    VALUES are ``make_run_options``'s, in their CLI spellings.
    """
    if options is not None and values:
        raise TypeError("pass either options or keyword arguments")
    opts = options or make_run_options(uri, **values)
    validate(opts)  # before connecting: a bad value is not a libvirt problem
    with connected(uri) as conn:
        return create_vm(conn, image, opts)


def create(image: str, options: RunOptions | None = None, *, uri: str | None = None,
           **values: Any) -> Vm:  # fmt: skip
    """Define a VM without starting it (``bcvk libvirt create``)."""
    opts = options or make_run_options(uri, **values)
    return run(image, dataclasses.replace(opts, start=False, ssh_wait=False), uri=uri)


# ------------------------------------------------------------------ other verbs


def list_vms(
    uri: str | None = None, *, all_states: bool = False, label: str | None = None
) -> list[Vm]:
    with connected(uri) as conn:
        return filter_vms(all_vms(conn), all_states=all_states, label=label)


def listing_json(vm: Vm, *, private_key: bool = False) -> dict[str, object]:
    """VM as `list --format json` shows it; with PRIVATE_KEY, the key itself
    too (upstream's `ssh_private_key`, for consumers that read it there)."""
    data = vm.to_json()
    if private_key:
        path = vm.metadata.ssh_private_key_path
        try:
            data["ssh_private_key"] = Path(path).read_text() if path else None
        except OSError as exc:
            raise BcvkError(
                f"cannot read VM {vm.name}'s private key {path}: {exc.strerror}",
                hint="run as the user who created the VM",
            ) from exc
    return data


def inspect(name: str, uri: str | None = None) -> Vm:
    validate_vm_name(name)  # before connecting: bad input is not libvirt's problem
    with connected(uri) as conn:
        return get_vm(conn, name)[1]


def find(name: str, uri: str | None = None) -> tuple[bool, Vm | None]:
    """Whether a domain NAME exists, and bcvk's view of it when bcvk made it
    (None for a domain made by hand, or a copy of a bcvk VM)."""
    validate_vm_name(name)  # before connecting: bad input is not libvirt's problem
    with connected(uri) as conn:
        try:
            dom = conn.get(name)
        except DomainNotFound:
            return False, None
        vm = read_vm(conn, dom)
        return True, vm if vm is not None and vm.copied_from is None else None


def domain_xml(name: str, uri: str | None = None) -> str:
    validate_vm_name(name)  # before connecting: bad input is not libvirt's problem
    with connected(uri) as conn:
        dom, _ = get_vm(conn, name)
        return dom.xml()


def _answering(name: str, uri: str | None, timeout: float) -> ssh.Target:
    """Running VM NAME's SSH target, once its sshd answers (up to TIMEOUT)."""
    validate_vm_name(name)  # before connecting: bad input is not libvirt's problem
    with connected(uri) as conn:
        dom, vm = lifecycle.running_vm(conn, name)
        target = vm.ssh_target()
        if not ssh.probe(target):
            lifecycle.wait_for_ssh(dom, vm, timeout)
    return target


def _as(target: ssh.Target, user: str | None, options: Sequence[str]) -> ssh.Target:
    changes: dict[str, Any] = {"options": tuple(options)}
    if user is not None:
        changes["user"] = user  # validated by Target
    return dataclasses.replace(target, **changes)


def ssh_command(
    name: str,
    command: Sequence[str] = (),
    *,
    uri: str | None = None,
    capture: bool = True,
    timeout: float = 60.0,
    user: str | None = None,
    options: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run COMMAND in VM NAME over SSH (waiting up to TIMEOUT for sshd) as USER
    (default: the VM's) with ssh OPTIONS (``ssh.user_options``); never raises
    on the command's exit status."""
    target = _as(_answering(name, uri, timeout), user, options)
    return ssh.execute(target, list(command), capture=capture)


def ssh_interactive(
    name: str, command: Sequence[str] = (), *, uri: str | None = None, timeout: float = 60.0,
    user: str | None = None, options: Sequence[str] = (),
) -> int:  # fmt: skip
    return ssh.interactive(_as(_answering(name, uri, timeout), user, options), list(command))


def scp(
    source: str, dest: str, *, uri: str | None = None, recursive: bool = False,
    timeout: float = 60.0, user: str | None = None, options: Sequence[str] = (),
) -> int:  # fmt: skip
    """`libvirt scp SRC DST`: one side is ``DOMAIN:PATH``; returns scp's exit status."""
    name, _, _ = ssh.scp_endpoints(source, dest, "libvirt")
    target = _as(_answering(name, uri, timeout), user, options)
    return ssh.copy(target, source, dest, recursive=recursive)


def start(
    name: str, *, uri: str | None = None, ssh_wait: bool = False, timeout: float = SSH_TIMEOUT
) -> Vm:
    validate_vm_name(name)  # before connecting: bad input is not libvirt's problem
    with connected(uri) as conn:
        dom, vm = get_vm(conn, name)
        if vm.running:
            logger.info("VM %s is already running", name)
        else:
            with step(f"Starting VM {name}"):
                dom.start()
            vm = read_vm(conn, dom) or vm
        if ssh_wait:
            lifecycle.wait_for_ssh(dom, vm, timeout)
        return vm


def stop(
    name: str, *, uri: str | None = None, force: bool = False, timeout: float = STOP_TIMEOUT
) -> None:
    validate_vm_name(name)  # before connecting: bad input is not libvirt's problem
    with connected(uri) as conn:
        dom, vm = get_vm(conn, name)
        plan = plan_removal(conn, vm)
        lifecycle.stop_domain(dom, force=force, timeout=timeout)
        if not vm.persistent:
            # A transient domain is gone once stopped: so are its key and NVRAM.
            if plan.key_dir:
                shutil.rmtree(plan.key_dir, ignore_errors=True)
            lifecycle.remove_transient_nvram(plan)


def rm(name: str, *, uri: str | None = None, force: bool = False) -> Removal:
    validate_vm_name(name)  # before connecting: bad input is not libvirt's problem
    with connected(uri) as conn:
        return remove(conn, name, force=force)


def rm_all(
    *, uri: str | None = None, force: bool = False, label: str | None = None
) -> tuple[list[str], list[str]]:
    """Remove every bcvk VM (with LABEL); running ones only with FORCE.

    Returns (removed, skipped) names.
    """
    removed: list[str] = []
    skipped: list[str] = []
    with connected(uri) as conn:
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
    with connected(uri) as conn:
        lib = conn.lib_version()
        hyp = conn.hypervisor_version()
        vms = all_vms(conn)
        local = not conn.info.remote
        real = virtiofsd.find() if local else None
        arch = os.uname().machine
        virttype = domain_type(conn, None)
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


VOLUME_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


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
    filesystem: to_disk.Filesystem | str | None = None,
    root_size: int | None = None,
    kargs: Sequence[str] = (),
    replace: bool = False,
) -> str:
    """Build IMAGE's disk locally and stream it into POOL; returns the volume's path."""
    if volume_name is not None and not VOLUME_NAME_RE.fullmatch(volume_name):
        raise UsageError(
            f"invalid volume name {volume_name!r}",
            hint="1-128 letters, digits, '.', '_' or '-', not starting with '.'",
        )
    fs = parse_choice(to_disk.Filesystem, filesystem, "--filesystem") if filesystem else None
    info = image_info(image)
    install = basedisks.InstallOptions(disk_size, fs, root_size, tuple(kargs))
    name = volume_name or default_volume_name(image, info.digest or info.id, "qcow2")
    with connected(uri) as conn:
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
        with basedisks.scratch_dir() as tmp:
            req = basedisks.disk_request(image, tmp / name, install)
            to_disk.run(req)
            volume = basedisks.upload_file(target_pool, req.output, name, "qcow2")
        logger.info(
            "Uploaded %s to pool %s in %.1fs", name, target_pool.name, time.monotonic() - start_time
        )
        return volume.path


# ------------------------------------------------------------------ base disks


def base_disks(uri: str | None = None, pool: str = "default") -> list[basedisks.BaseDiskInfo]:
    with connected(uri) as conn:
        target = conn.pool(pool)
        if target is None:
            return []
        return basedisks.list_base_disks(conn, target)


def prune_base_disks(
    uri: str | None = None, pool: str = "default", dry_run: bool = False
) -> list[basedisks.BaseDiskInfo]:
    with connected(uri) as conn:
        target = conn.pool(pool)
        if target is None:
            return []
        return basedisks.prune(conn, target, dry_run=dry_run)


def to_base_disk(
    image: str,
    *,
    uri: str | None = None,
    pool: str = "default",
    disk_size: int = DEFAULT_DISK_SIZE,
    filesystem: to_disk.Filesystem | str | None = None,
    root_size: int | None = None,
    kargs: Sequence[str] = (),
) -> basedisks.BaseDisk:
    """IMAGE's base disk in POOL, built unless one with these options exists
    (``reused`` says which); the disk ``libvirt run`` would clone."""
    fs = parse_choice(to_disk.Filesystem, filesystem, "--filesystem") if filesystem else None
    install = install_options(disk_size, fs, root_size, [parse_karg(k) for k in kargs])
    to_disk.check_disk_size(disk_size, fs)
    image_info(image)  # a missing or non-bootc image fails before the pool is touched
    with connected(uri) as conn:
        return basedisks.ensure(conn, conn.ensure_pool(pool), image, install)


# ------------------------------------------------------------------ volumes


@dataclass(frozen=True)
class VolumeRow:
    """A pool volume as `list-volumes` shows it."""

    name: str
    kind: str  # "base" (a base disk), "vm" (a bcvk VM's disk) or "other"
    path: str
    format: str
    size: int  # allocated bytes
    virtual_size: int
    backing: str | None
    vms: tuple[str, ...]  # bcvk VMs using it
    images: tuple[str, ...]  # their source images

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "path": self.path,
            "format": self.format,
            "size": self.size,
            "virtual_size": self.virtual_size,
            "backing_file": self.backing,
            "vms": list(self.vms),
            "source_images": list(self.images),
        }


def list_volumes(
    uri: str | None = None,
    pool: str = "default",
    *,
    all_volumes: bool = False,
    source_image: str | None = None,
) -> list[VolumeRow]:
    """POOL's base disks and bcvk VM disks (ALL_VOLUMES: every volume), with
    the VMs that use each; SOURCE_IMAGE keeps those of that image."""
    with connected(uri) as conn:
        target = conn.pool(pool)
        if target is None:
            raise NotFoundError(
                f"storage pool {pool!r} does not exist",
                hint="bcvk makes `default` with its first VM; see `virsh pool-list --all`",
            )
        target.refresh()
        infos = sorted((v.info() for v in target.volumes()), key=lambda i: i.name)
        vms = all_vms(conn)
    rows = []
    for info in infos:
        users = sorted(
            (vm for vm in vms if info.path in vm.disks or vm.metadata.base_disk == info.name),
            key=lambda vm: vm.name,
        )
        kind = "base" if basedisks.is_base_name(info.name) else "vm" if users else "other"
        images = tuple(sorted({vm.metadata.source_image for vm in users}))
        if kind == "other" and not all_volumes:
            continue
        if source_image is not None and source_image not in images:
            continue
        rows.append(
            VolumeRow(
                info.name, kind, info.path, info.format, info.allocation, info.capacity,
                info.backing_path, tuple(vm.name for vm in users), images,
            )
        )  # fmt: skip
    return rows
