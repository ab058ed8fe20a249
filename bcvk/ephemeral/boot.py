"""Booting one ephemeral VM, as a list of stages.

``start`` runs them in order: ``ensure_image``, ``reserve`` a registry
entry, ``launch.prepare`` the machine, ``launch.drives``, ``_plan`` the
start (cold, cold and save, or restore: ``bcvk.ephemeral.warm``), then
``inject_key`` (cold) or a bare key pair (restore), ``launch.launch`` the
processes, ``_restore`` a warm VM, and either ``hand_over`` (detached) or
wait for SSH (and ``warm.save`` the first VM of a configuration).
Whatever fails, everything started so far is torn down: processes, image
mount, files it created and the registry entry; a restore that fails also
removes its snapshot, and ``start`` boots the VM cold instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import sys
import time
from pathlib import Path

from bcvk.ephemeral import cache, launch, registry, warm
from bcvk.ephemeral.launch import Launch, Machine
from bcvk.ephemeral.options import (
    Options,
    RootfsMode,
    WarmMode,
    check_ports_free,
    free_port,
    new_name,
)
from bcvk.ephemeral.vm import (
    GuestPoweredOff,
    Vm,
    confirm_started,
    teardown,
    wait_for_ssh,
)
from bcvk.errors import BcvkError, NotFoundError, ToolMissingError, UsageError
from bcvk.guest import cloudinit, credentials, initrd, mounts, stall
from bcvk.host import podman, qemu, ssh
from bcvk.log import logger
from bcvk.run import signals_deferred
from bcvk.values import PullPolicy


def ensure_image(opts: Options) -> podman.ImageInfo:
    try:
        return podman.ensure_image(opts.image, opts.pull)
    except NotFoundError as exc:
        if opts.pull is PullPolicy.never:
            raise NotFoundError(
                f"image {opts.image} is not in local storage",
                hint="build or pull it first, or drop --pull never",
            ) from exc
        raise


def reserve(opts: Options, info: podman.ImageInfo) -> tuple[registry.VmDir, registry.VmRecord]:
    """The VM's name and registry entry, with an SSH port no other VM holds."""
    name = opts.name or new_name()
    # Until it hands a detached VM over, this bcvk supervises it: a record
    # with neither a live QEMU nor a live supervisor is stale and reaped.
    supervisor = registry.Proc.of("bcvk", os.getpid(), group=False)

    def make_record(used: set[int]) -> registry.VmRecord:
        return registry.VmRecord(
            name=name,
            image=opts.image,
            image_id=info.id,
            ssh_port=free_port(used | {f.host for f in opts.ports}),
            forwards=[(f.host, f.guest) for f in opts.ports],
            memory_mib=opts.memory_mib,
            vcpus=opts.vcpus,
            detached=opts.detach,
            supervisor=supervisor,
            rootless=podman.rootless(),
            project=opts.project,
            labels=list(opts.labels),
        )

    return registry.create(name, make_record)


def inject_key(machine: Machine, state: Launch) -> credentials.KeyInjection:
    """A fresh key pair for the VM, and the routes that hand its public half in."""
    key = ssh.generate_key(state.vmdir.path, comment=f"bcvk-{state.record.name}")
    facts = machine.facts
    routes = credentials.choose_routes(facts.systemd_version, facts.has_cloud_init)
    if forced := os.environ.get("BCVK_SSH_KEY_ROUTES"):
        try:
            routes = credentials.parse_routes(forced)
        except ValueError as exc:
            raise UsageError(str(exc), hint="unset BCVK_SSH_KEY_ROUTES for the default") from None
    return credentials.inject_key(
        key.public_text(),
        routes,
        hostname=state.record.name,
        systemd_version=facts.systemd_version,
    )


def seed_drive(state: Launch, injection: credentials.KeyInjection) -> qemu.Drive | None:
    """A NoCloud seed: the user's (--cloud-init), else bcvk's key for images running
    cloud-init, which may override credentials."""
    files = state.opts.cloud_init or injection.nocloud
    if not files:
        return None
    if not any(name == "meta-data" for name, _ in files):
        meta = credentials.nocloud_meta_data(state.record.name, f"bcvk-{state.record.token[:12]}")
        files = (*files, ("meta-data", meta))
    seed = state.vmdir.path / "seed.img"
    if not cloudinit.vfat_seed(files, seed):
        if state.opts.cloud_init:
            raise ToolMissingError(
                "--cloud-init: cannot build the seed disk", hint="install dosfstools and mtools"
            )
        return None
    return qemu.Drive(os.fspath(seed), "raw", "cidata", readonly=True)


def guest_setup(machine: Machine) -> tuple[str, ...]:
    """Shell steps that mount the shares and enable swap in the guest (as root)."""
    opts = machine.opts
    at_boot = boot_mounted(machine)
    script = [mounts.mount_command(b, ninep=machine.ninep) for b in opts.binds if b not in at_boot]
    if opts.add_swap:
        script.append("swapon /dev/disk/by-id/virtio-swap")
    if opts.bind_storage_ro:
        script.append(mounts.host_storage_setup())
    return tuple(script)


def after_ready(vm: Vm, machine: Machine, state: Launch) -> None:
    """What the guest gets over SSH once it answers: share mounts and swap."""
    if script := guest_setup(machine):
        result = vm.ssh(" && ".join(script))
        if result.returncode != 0:
            raise BcvkError(
                f"could not set up shares/swap in VM {vm.name}: "
                + ((result.stderr or "").strip().splitlines() or ["?"])[-1],
                hint="the guest kernel needs virtiofs (or 9p) modules for --bind",
            )


def units_initrd(machine: Machine, state: Launch) -> Path:
    """This VM's initramfs: the cached one plus an archive of its --systemd-units."""
    base = machine.prepared.initrd
    if base is None:
        raise BcvkError(
            f"--systemd-units: the kernel of {machine.opts.image} boots without an initramfs",
            hint="the units travel in an initramfs archive; the image needs an initramfs",
        )
    units = (*machine.opts.systemd_units, *initrd.mount_members(boot_mounted(machine)))
    return initrd.with_units(base, units, state.vmdir.path / "initrd.img")


def boot_mounted(machine: Machine) -> tuple[mounts.Share, ...]:
    """The shares mounted at boot by units (so the --systemd-units can use them),
    rather than over SSH once it answers: virtiofs shares of a VM that has its
    own initramfs archive anyway."""
    if not machine.opts.systemd_units or machine.ninep:
        return ()
    return machine.opts.binds


def check_execute(opts: Options, machine: Machine) -> None:
    """--execute's script arrives as a system credential, which systemd reads from 252 on."""
    version = machine.facts.systemd_version
    if opts.execute and (version is None or version < 252):
        found = f"systemd {version}" if version else "no systemd"
        raise BcvkError(
            f"--execute needs systemd 252 or newer in the image ({opts.image} has {found})",
            hint=f"run the command over SSH instead: bcvk ephemeral run-ssh {opts.image} -- CMD",
        )


def _console_log(opts: Options, vmdir: registry.VmDir) -> str:
    if opts.log_dir and opts.log_dir.console:
        return os.fspath(opts.log_dir.console_file)
    return os.fspath(vmdir.console_log)


def start(opts: Options) -> Vm:
    """Boot the VM OPTS describe; return once SSH answers (or, detached, once it runs).

    A VM that can start warm (``bcvk.ephemeral.warm``) is restored from its
    configuration's snapshot; a snapshot that does not restore is removed
    and the VM boots cold (saving a new one).
    """
    check_ports_free(opts.ports)
    if opts.virtiofsd is not None or opts.rootfs is RootfsMode.virtiofs:
        # Fail before any work when an explicitly requested virtiofsd is unusable.
        launch.choose_rootfs(opts, None)
    info = ensure_image(opts)
    try:
        return _start_once(opts, info)
    except stall.KernelStalled as exc:
        # Nothing of an ephemeral VM outlives it, so booting again loses nothing.
        logger.warning("%s; booting it again", exc)
        return _start_once(opts, info)


def _start_once(opts: Options, info: podman.ImageInfo) -> Vm:
    try:
        return _start(opts, info)
    except warm.Unusable:
        return _start(dataclasses.replace(opts, warm=WarmMode.refresh), info)


def _plan(
    opts: Options,
    reason: str | None,
    machine: Machine,
    state: Launch,
    drives: tuple[qemu.Drive, ...],
) -> warm.Plan:
    reason = reason or warm.machine_reason(machine)
    if reason is not None:
        return warm.plan(opts, reason, None)
    spec = launch.qemu_spec(machine, state, (), (), (), drives, 0, launch.WarmDevices(0))
    snapshot = cache.Snapshot(machine.prepared.entry, warm.snapshot_key(spec))
    return warm.plan(opts, None, snapshot)


def _start(opts: Options, info: podman.ImageInfo) -> Vm:
    vmdir, record = reserve(opts, info)
    state = Launch(opts, info, vmdir, record)
    vm = Vm(vmdir, record, owner=True)
    made_log_dir = False
    plan: warm.Plan | None = None
    incoming: int | None = None
    try:
        if opts.log_dir and not opts.log_dir.directory.exists():
            opts.log_dir.directory.mkdir()
            made_log_dir = True
        record.console_log = _console_log(opts, vmdir)
        cannot_warm = warm.option_reason(opts)
        machine = launch.prepare(state, prefer_block=cannot_warm is None)
        vm.facts = machine.facts
        check_execute(opts, machine)
        if opts.systemd_units:
            state.initrd = units_initrd(machine, state)
        drives = launch.drives(machine, state)
        plan = _plan(opts, cannot_warm, machine, state, drives)
        # Asked for explicitly (or by to-disk's installer): nothing to explain.
        announce = logger.debug if opts.warm is WarmMode.off else logger.info
        announce("%s", plan.message())
        smbios: tuple[str, ...] = ()
        kargs: tuple[str, ...] = ()
        if plan.mode == "restore":
            assert plan.snapshot is not None
            # The snapshot holds no key: this VM's own goes in over the control port.
            ssh.generate_key(vmdir.path, comment=f"bcvk-{record.name}")
            incoming = warm.open_state(plan.snapshot)
            record.start = "warm"
        else:
            injection = inject_key(machine, state)
            if (seed := seed_drive(state, injection)) is not None:
                drives = (*drives, seed)
            smbios, kargs = injection.smbios, injection.kernel_args
            if opts.execute:
                script = initrd.execute_script(opts.execute, guest_setup(machine))
                smbios = (*smbios, credentials.smbios_value(initrd.EXECUTE_CREDENTIAL, script))
        vmdir.write(record)
        asyncio.run(
            launch.launch(
                machine, state, smbios, kargs, drives,
                warm=plan.warm_devices, incoming=incoming,
            )
        )  # fmt: skip
        vm.children = state.children
        record.phase = "running"
        vmdir.write(record)
        if plan.mode == "restore":
            _restore(vm, opts)
        if opts.detach:
            return hand_over(vm, machine, state)
        if opts.execute:
            return vm  # the guest runs the commands itself (ephemeral.run_vm follows them)
        if plan.mode != "restore":  # a restored VM answered SSH already
            asyncio.run(
                wait_for_ssh(
                    vm,
                    opts.ssh_timeout,
                    progress=_progress(opts) and not opts.console,
                    allow_poweroff=not opts.execute,
                    kernel=_kernel_watch(vm, state),
                )
            )
        if plan.mode == "save":
            assert plan.snapshot is not None
            warm.save(vm, plan.snapshot, ssh.KeyPair(vm.key).public_text(), opts.image)
        after_ready(vm, machine, state)
        launch.keep_created_disks(state)
        return vm
    except GuestPoweredOff:
        launch.keep_created_disks(state)
        vm.stop(graceful=False)
        raise
    except BaseException as exc:
        vm.children = state.children
        with signals_deferred():
            for sock in state.listeners:
                sock.close()
            teardown(vm, graceful=False, timeout=0)
            if made_log_dir and opts.log_dir is not None:
                _remove_if_empty(opts.log_dir.directory)
        if isinstance(exc, warm.Unusable) and plan is not None and plan.snapshot is not None:
            warm.discard(plan.snapshot, str(exc))
        raise
    finally:
        if incoming is not None:
            os.close(incoming)
        state.close()


def _restore(vm: Vm, opts: Options) -> None:
    """Run the restored machine, hand it its key, and wait for its sshd."""
    began = resumed = time.monotonic()
    probe: socket.socket | None = None

    def resume() -> None:
        nonlocal resumed, probe
        warm.resume(vm)
        resumed = time.monotonic()
        # Opened now (QEMU forwards the port once it is up), answered by the
        # guest's sshd while its agent takes the key.
        with contextlib.suppress(OSError):
            probe = socket.create_connection(("127.0.0.1", vm.ssh_port), timeout=5)

    try:
        warm.hand_in(vm, ssh.KeyPair(vm.key).public_text(), resume=resume)
        handed = time.monotonic()
        # sshd was serving when the machine was saved, and the agent has put
        # this VM's key in place: its banner on the new port is proof enough
        # (a full `ssh … true` would add a key exchange, seconds under TCG).
        warm.wait_banner(vm, min(opts.ssh_timeout, 60.0), first=probe)
    except BcvkError as exc:
        raise warm.Unusable(str(exc).splitlines()[0]) from None
    finally:
        if probe is not None:
            probe.close()
    logger.debug(
        "warm start: loaded %.1fs, key in %.1fs, sshd answered %.1fs after QEMU started",
        resumed - began,
        handed - began,
        time.monotonic() - began,
    )


def hand_over(vm: Vm, machine: Machine, state: Launch) -> Vm:
    """Detach: once QEMU runs (and SSH answers, when shares need it), let it go."""
    opts = machine.opts
    confirm_started(vm)
    if opts.binds or opts.add_swap:
        # These are set up over SSH, so this detached start waits for it.
        asyncio.run(
            wait_for_ssh(
                vm,
                opts.ssh_timeout,
                progress=_progress(opts),
                allow_poweroff=False,
                kernel=_kernel_watch(vm, state),
            )
        )
        after_ready(vm, machine, state)
    launch.keep_created_disks(state)
    vm.record.supervisor = None
    vm.dir.write(vm.record)
    vm.owner = False
    return vm


def _kernel_watch(vm: Vm, state: Launch) -> stall.Watch | None:
    return stall.watch(vm.console_log, state.cmdline, state.opts.boot_stall)


def _progress(opts: Options) -> bool:
    return opts.progress if opts.progress is not None else sys.stderr.isatty()


def _remove_if_empty(path: os.PathLike[str]) -> None:
    # Not empty: console.txt holds the boot log the error points at.
    with contextlib.suppress(OSError):
        os.rmdir(path)
