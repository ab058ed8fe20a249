"""Ephemeral VMs: boot a bootc image straight from the container store.

The image's own kernel and initramfs boot directly (no bootloader); the root
filesystem comes read-only from the image (virtiofs, or a cached ext4 image on
virtio-blk); an archive bcvk appends to the initramfs (``bcvk.guest.initrd``)
gives the guest bootc's layout: ``/etc`` an overlay, ``/var`` a tmpfs copy,
and every write vanishes with the VM.  An SSH key made for the VM arrives as a
systemd credential; readiness is a real ``ssh … true``.

The package: ``options`` (what users ask for), ``cache`` (what each image
needs, prepared once), ``registry`` (running VMs on disk), ``launch`` (the
processes), ``vm`` (a running VM), ``boot`` (the start pipeline); this
module holds the verbs and is the API other features use.

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
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bcvk import run
from bcvk.ephemeral import boot, cache, execute, registry
from bcvk.ephemeral.cache import CacheInfo
from bcvk.ephemeral.cache import SnapshotInfo as CacheSnapshot
from bcvk.ephemeral.options import (
    DEFAULT_SSH_TIMEOUT,
    DiskFile,
    Options,
    RootfsMode,
    WarmMode,
    make_options,
)
from bcvk.ephemeral.vm import GuestPoweredOff, Vm, wait_for_ssh
from bcvk.errors import NotFoundError, UsageError
from bcvk.guest.logdir import LogDir
from bcvk.host import ssh
from bcvk.log import logger
from bcvk.values import validate_label

__all__ = [
    "DEFAULT_SSH_TIMEOUT",
    "CacheInfo",
    "CacheSnapshot",
    "DiskFile",
    "LogDir",
    "Options",
    "RootfsMode",
    "Vm",
    "VmInfo",
    "WarmMode",
    "attach",
    "cache_list",
    "cache_prune",
    "make_options",
    "ps",
    "rm",
    "rm_all",
    "run_ssh",
    "run_vm",
    "ssh_into",
    "start",
]


def start(image: str | Options, **kwargs: Any) -> Vm:
    """Boot IMAGE and return when SSH answers (or, detached, once QEMU runs).

    Keyword arguments are those of ``make_options`` (CLI spellings:
    ``memory="2G"``, ``binds=["/srv:data"]``, …).  On any failure nothing is
    left behind: processes, image mount and state directory are removed.
    """
    opts = image if isinstance(image, Options) else make_options(image, **kwargs)
    return boot.start(opts)


def cache_list() -> list[CacheInfo]:
    """The per-image cache: size, last use, whether the image is present or in use."""
    return cache.describe()


def cache_prune(
    *, older_than_days: float | None, everything: bool, dry_run: bool
) -> list[CacheInfo]:
    return cache.prune(older_than_days=older_than_days, everything=everything, dry_run=dry_run)


def run_vm(opts: Options) -> int:
    """`ephemeral run` in the foreground: boot, then run --execute or wait for the end."""
    try:
        vm = boot.start(opts)
    except GuestPoweredOff:
        logger.info("the VM powered off")
        return 0
    if opts.detach:
        return 0
    with vm:
        if opts.execute:
            try:
                status = execute.follow(vm, sys.stdout.buffer, sys.stderr.buffer)
            except KeyboardInterrupt:
                logger.info("stopping VM %s…", vm.name)
                vm.stop(graceful=True, timeout=20)
                raise
            if status != 0:
                logger.error("--execute exited with status %d", status)
            vm.stop(graceful=False)
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
        raise UsageError("run-ssh cannot detach", hint="use `ephemeral run -d`, then `ssh`")
    vm = boot.start(opts)
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
    found = registry.lookup(name)
    if found is None:
        raise NotFoundError(
            f"no ephemeral VM named {name!r}", hint="list them with `bcvk ephemeral ps`"
        )
    d, record = found
    return Vm(d, record, facts=cache.entry_for(record.image_id).facts(), owner=False)


def ssh_into(name: str, args: Sequence[str] = (), *, timeout: float = DEFAULT_SSH_TIMEOUT) -> int:
    """`ephemeral ssh NAME [SSH-OPTIONS] [COMMAND…]`; returns ssh's exit status."""
    vm = attach(name)
    options, command = ssh.split_args(args)
    if not ssh.probe(vm.target(connect_timeout=5)):
        asyncio.run(wait_for_ssh(vm, timeout, progress=sys.stderr.isatty(), allow_poweroff=False))
    tty = None if command else True
    argv = ssh.argv(vm.target(), command, tty=tty, extra=options)
    result = run.run(argv, check=False, capture=False, stdout=1, stdin=0)
    return int(result.returncode)


def scp(source: str, dest: str, *, recursive: bool = False, timeout: float = 60.0) -> int:
    """`ephemeral scp SRC DST`: one side is ``NAME:PATH``; returns scp's exit status."""
    name, _, _ = ssh.scp_endpoints(source, dest, "ephemeral")
    vm = attach(name)
    if not ssh.probe(vm.target(connect_timeout=5)):
        asyncio.run(wait_for_ssh(vm, timeout, progress=sys.stderr.isatty(), allow_poweroff=False))
    return ssh.copy(vm.target(), source, dest, recursive=recursive)


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
    project: str = ""  # the bcvk.toml it was started from (JSON), or ""
    ssh_private_key_path: str = ""
    labels: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "image": self.image,
            "state": self.state,
            "ssh_port": self.ssh_port,
            "ssh_private_key_path": self.ssh_private_key_path,
            "pid": self.pid,
            "rootfs": self.rootfs,
            "created": int(self.created),
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "detached": self.detached,
            "ports": [f"{h}:{g}" for h, g in self.forwards],
            "labels": list(self.labels),
            # Upstream prints `podman ps --format json` of its VM containers;
            # these are its keys that mean the same thing for a VM.
            "Names": [self.name],
            "Image": self.image,
            "State": self.state,
            "Created": int(self.created),
            "Pid": self.pid or 0,
            "Labels": dict(label.partition("=")[::2] for label in self.labels),
            "Ports": [
                {"host_ip": "127.0.0.1", "host_port": h, "container_port": g, "protocol": "tcp"}
                for h, g in [(self.ssh_port, 22), *self.forwards]
            ],
        }


def ps(*, label: str | None = None) -> list[VmInfo]:
    """Running ephemeral VMs (stale state is reaped on the way); with LABEL,
    those that carry it (``KEY`` or ``KEY=VALUE``, matched whole)."""
    if label is not None:
        validate_label(label)
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
            project=record.project,
            ssh_private_key_path=str(d.key),
            labels=tuple(record.labels),
        )
        for d, record in registry.scan()
        if label is None or label in record.labels
    ]


def rm(name: str, *, force: bool = False) -> bool:
    """Stop VM NAME and remove its state; False if there was none (with FORCE)."""
    existed = registry.vm_dir(name).path.exists()
    found = registry.lookup(name)
    if found is None:
        if existed and not registry.vm_dir(name).path.exists():
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


def rm_all(*, force: bool = True, label: str | None = None) -> list[str]:
    names = [vm.name for vm in ps(label=label)]
    for name in names:
        rm(name, force=True)
    return names
