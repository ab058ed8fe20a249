"""Ephemeral VMs: boot a bootc image straight from the container store.

The image's own kernel and initramfs boot directly (no bootloader); the root
filesystem comes read-only from the image (virtiofs, or a cached ext4 image on
virtio-blk) under ``systemd.volatile=overlay``, so the guest can write to ``/``
and every write vanishes with the VM.  An SSH key made for the VM arrives as a
systemd credential; readiness is a real ``ssh … true``.

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
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from bcvk import run
from bcvk.ephemeral import cache as rootfs
from bcvk.ephemeral import launch
from bcvk.ephemeral import registry as state
from bcvk.ephemeral.launch import Plan, console_tail, file_tail
from bcvk.ephemeral.options import (
    DEFAULT_SSH_TIMEOUT,
    ITYPES,
    Bind,
    DiskFile,
    LogDir,
    Options,
    check_ports_free,
    free_port,
    make_options,
    new_name,
    parse_bind,
    parse_disk,
    parse_itype,
    parse_karg,
    parse_log_dir,
    parse_memory,
    parse_port,
    parse_vcpus,
    split_ssh_args,
)
from bcvk.errors import BcvkError, NotFoundError, UsageError, WaitTimeout
from bcvk.guest import credentials
from bcvk.host import accel, podman, qmp, ssh
from bcvk.image.tree import TreeFacts
from bcvk.log import logger

__all__ = [
    "DEFAULT_SSH_TIMEOUT",
    "ITYPES",
    "Bind",
    "DiskFile",
    "LogDir",
    "Options",
    "Vm",
    "attach",
    "check_ports_free",
    "console_tail",
    "free_port",
    "make_options",
    "mount_command",
    "parse_bind",
    "parse_disk",
    "parse_itype",
    "parse_karg",
    "parse_log_dir",
    "parse_memory",
    "parse_port",
    "parse_vcpus",
    "ps",
    "rm",
    "rm_all",
    "run_ssh",
    "run_vm",
    "split_ssh_args",
    "ssh_into",
    "start",
]


def mount_command(bind: Bind, ninep: bool) -> str:
    """Shell text run in the guest (as root) to mount a host share."""
    target = shlex.quote(bind.guest_path)
    if ninep:
        opts = "trans=virtio,version=9p2000.L,msize=524288" + (",ro" if bind.readonly else "")
        mount = f"mount -t 9p -o {opts} {bind.tag} {target}"
    else:
        mount = f"mount -t virtiofs {'-o ro ' if bind.readonly else ''}{bind.tag} {target}"
    return f"mkdir -p {target} && {mount}"


def no_ssh_hint(facts: TreeFacts | None) -> str:
    if facts is not None and not facts.sshd_installed:
        return "the image has no sshd (/usr/sbin/sshd is missing): install openssh-server in it"
    if facts is not None and not facts.sshd_enabled:
        return "sshd is installed in the image but not enabled: `systemctl enable sshd` (or ssh)"
    return "see the console log; a slow host may need a longer --ssh-timeout"


# ---------------------------------------------------------------- the VM


class Vm:
    """A running ephemeral VM.

    Owned VMs (started in this process) are torn down by ``stop()`` or when
    the ``with`` block ends; VMs found by ``attach()`` are only stopped when
    asked.
    """

    def __init__(
        self,
        vmdir: state.VmDir,
        record: state.VmRecord,
        *,
        facts: TreeFacts | None = None,
        children: Sequence[subprocess.Popen[bytes]] = (),
        owner: bool = False,
    ) -> None:
        self.dir = vmdir
        self.record = record
        self.facts = facts
        self.children = list(children)
        self.owner = owner
        self.stopped = False

    # -- facts
    @property
    def name(self) -> str:
        return self.record.name

    @property
    def ssh_port(self) -> int:
        return self.record.ssh_port

    @property
    def key(self) -> Path:
        return self.dir.key

    @property
    def console_log(self) -> Path:
        return Path(self.record.console_log or self.dir.console_log)

    def target(self, connect_timeout: int = 5) -> ssh.Target:
        return ssh.Target(port=self.ssh_port, key=self.key, connect_timeout=connect_timeout)

    def alive(self) -> bool:
        return self.record.qemu is not None and self.record.qemu.alive()

    # -- guest access
    def ssh(
        self,
        command: str | Sequence[str],
        *,
        check: bool = False,
        capture: bool = True,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run COMMAND in the guest as root; output captured unless CAPTURE is off."""
        words = [command] if isinstance(command, str) else list(command)
        result = ssh.execute(self.target(), words, capture=capture, timeout=timeout)
        if check and result.returncode != 0:
            raise BcvkError(
                f"command failed in VM {self.name} with exit status {result.returncode}: "
                + shlex.join(words),
                hint=(result.stderr or "").strip()[-500:] or None,
            )
        return result

    def wait_ready(self, timeout: float = DEFAULT_SSH_TIMEOUT, *, progress: bool = False) -> None:
        """Block until ``ssh … true`` succeeds (or raise with the likely cause)."""
        asyncio.run(_wait_ready(self, timeout, progress=progress, allow_poweroff=False))

    # -- lifecycle
    def stop(self, *, graceful: bool = True, timeout: float = 30.0) -> None:
        """Power the VM off (ACPI, then QMP quit, SIGTERM, SIGKILL) and remove its state."""
        if self.stopped:
            return
        with _signals_deferred():
            _teardown(self, graceful=graceful, timeout=timeout)
        self.stopped = True

    def __enter__(self) -> Vm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(graceful=False)

    def __repr__(self) -> str:
        return f"<Vm {self.name} ssh=127.0.0.1:{self.ssh_port}>"


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while tearing down, deliver them afterwards.

    A second Ctrl-C must not abandon a half-finished clean-up; every step
    of the clean-up has its own deadline, so the wait is bounded.
    """
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _wait_exit(vm: Vm, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in vm.children:
            child.poll()
        if not vm.alive():
            return True
        time.sleep(0.1)
    return not vm.alive()


def _teardown(vm: Vm, *, graceful: bool, timeout: float) -> None:
    record = vm.record
    if record.phase != "stopping" and vm.dir.path.exists():
        record.phase = "stopping"
        with contextlib.suppress(OSError):
            vm.dir.write(record)
    if vm.alive():
        if graceful:
            logger.debug("powering %s down", vm.name)
            if qmp.powerdown(vm.dir.qmp):
                _wait_exit(vm, timeout)
        if vm.alive() and qmp.quit(vm.dir.qmp):
            _wait_exit(vm, 5.0)
        if vm.alive() and record.qemu is not None:
            logger.debug("QEMU of %s did not quit; terminating it", vm.name)
            state.terminate([record.qemu], timeout=5.0)
    # virtiofsd exits by itself once QEMU hangs up; anything else gets signals.
    state.terminate(list(record.helpers), timeout=3.0)
    for child in vm.children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)
    state.reap(vm.dir, record)


class _Progress:
    """One self-rewriting status line on a terminal (elapsed + last console line)."""

    def __init__(self, enabled: bool, what: str, console: Path) -> None:
        self.enabled = enabled
        self.what = what
        self.console = console
        self.start = time.monotonic()
        self.shown = False

    def update(self) -> None:
        if not self.enabled:
            return
        width = 100
        with contextlib.suppress(OSError):
            width = os.get_terminal_size(sys.stderr.fileno()).columns
        last = console_tail(self.console, 1)
        line = f"{self.what} {time.monotonic() - self.start:4.0f}s"
        if last:
            line += f"  {last[0]}"
        sys.stderr.write("\r\033[K" + line[: max(10, width - 1)])
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


def _qemu_child(vm: Vm) -> subprocess.Popen[bytes] | None:
    """Our Popen of the VM's QEMU (polled, so that its exit status is known)."""
    pid = vm.record.qemu.pid if vm.record.qemu else -1
    for child in vm.children:
        if child.pid == pid:
            child.poll()
            return child
    return None


class GuestPoweredOff(Exception):
    """The guest shut down before SSH answered (e.g. systemd.unit=poweroff.target)."""


def _qemu_exit_error(vm: Vm, returncode: int | None) -> BcvkError:
    stderr = file_tail(vm.dir.qemu_log, 8)
    tail = console_tail(vm.console_log, 12)
    if stderr:
        message = f"QEMU exited during boot (status {returncode}): " + stderr[-1]
        detail = "\n".join("  qemu: " + line for line in stderr)
    else:
        message = f"VM {vm.name} stopped during boot (QEMU status {returncode})"
        detail = "\n".join("  console: " + line for line in tail)
    panic = any("Kernel panic" in line for line in tail)
    hint = f"QEMU's messages: {vm.dir.qemu_log}"
    if panic:
        hint = (
            "the guest kernel panicked; see the console lines above (wrong root=, missing driver?)"
        )
    return BcvkError(message + ("\n" + detail if detail else ""), hint=hint)


async def _wait_ready(vm: Vm, timeout: float, *, progress: bool, allow_poweroff: bool) -> None:
    """Poll ``ssh … true`` until it succeeds, QEMU exits, or TIMEOUT passes."""
    target = vm.target(connect_timeout=5)
    bar = _Progress(progress, f"Booting {vm.name}…", vm.console_log)
    deadline = time.monotonic() + timeout
    probe: asyncio.Task[bool] | None = None
    try:
        while True:
            qemu_proc = _qemu_child(vm)
            if not vm.alive():
                code = qemu_proc.wait() if qemu_proc is not None else None
                tail = console_tail(vm.console_log, 30)
                powered_off = code == 0 and any(
                    "reboot: Power down" in line or "Powering off" in line for line in tail
                )
                if powered_off and allow_poweroff:
                    raise GuestPoweredOff()
                raise _qemu_exit_error(vm, code)
            if probe is None:
                probe = asyncio.ensure_future(asyncio.to_thread(ssh.probe, target))
            elif probe.done():
                if probe.result():
                    return
                probe = None
                continue
            if time.monotonic() > deadline:
                tail = console_tail(vm.console_log, 12)
                lines = "\n".join("  console: " + line for line in tail) or "  (console is empty)"
                raise WaitTimeout(
                    f"VM {vm.name} did not answer SSH on 127.0.0.1:{vm.ssh_port} within "
                    f"{timeout:.0f}s; last console lines:\n{lines}",
                    hint=no_ssh_hint(vm.facts) + f" (console log: {vm.console_log})",
                )
            bar.update()
            await asyncio.sleep(0.5)
    finally:
        bar.clear()
        if probe is not None and not probe.done():
            # A probe in flight finishes on its own (ssh has a connect timeout).
            probe.cancel()


def _after_ready(vm: Vm, plan: Plan) -> None:
    """Set up what systemd < 256 cannot take as credentials: mounts, swap, journal."""
    opts = plan.opts
    ninep = plan.virtiofsd is None
    script = [mount_command(b, ninep) for b in opts.binds]
    if opts.add_swap:
        script.append("swapon /dev/disk/by-id/virtio-swap")
    if script:
        result = vm.ssh(" && ".join(script))
        if result.returncode != 0:
            raise BcvkError(
                f"could not set up shares/swap in VM {vm.name}: "
                + ((result.stderr or "").strip().splitlines() or ["?"])[-1],
                hint="the guest kernel needs virtiofs (or 9p) modules for --bind",
            )
    if opts.log_dir and opts.log_dir.journal:
        argv = ssh.argv(
            vm.target(), ["journalctl", "-b", "-f", "-o", "json", "--no-pager"], tty=False
        )
        out = (opts.log_dir.directory / "journal.json").open("ab")
        plan.logs.append(out)
        proc = run.spawn(
            argv,
            stdout=out,
            stderr=subprocess.DEVNULL,
            new_session=True,
            die_with_parent=not opts.detach,
        )
        vm.children.append(proc)
        vm.record.helpers.append(state.Proc.of("journal", proc.pid))
        vm.dir.write(vm.record)


def _ensure_image(opts: Options) -> podman.ImageInfo:
    try:
        return podman.ensure_image(opts.image, opts.pull)
    except NotFoundError as exc:
        if opts.pull == "never":
            raise NotFoundError(
                f"image {opts.image} is not in local storage",
                hint="build or pull it first, or drop --pull never",
            ) from exc
        raise


def start(image: str | Options, **kwargs: Any) -> Vm:
    """Boot IMAGE and return when SSH answers (or, detached, once QEMU runs).

    Keyword arguments are those of ``make_options`` (CLI spellings:
    ``memory="2G"``, ``binds=["/srv:data"]``, …).  On any failure nothing is
    left behind: processes, image mount and state directory are removed.
    """
    opts = image if isinstance(image, Options) else make_options(image, **kwargs)
    return _start(opts)


def _start(opts: Options) -> Vm:
    check_ports_free(opts.ports)
    if opts.virtiofsd is not None or opts.rootfs == "virtiofs":
        # Fail before any work when an explicitly requested virtiofsd is unusable.
        launch.choose_rootfs(opts, None)
    info = _ensure_image(opts)
    name = opts.name or new_name()
    # Until it hands a detached VM over, this bcvk supervises it: a record
    # with neither a live QEMU nor a live supervisor is stale and reaped.
    supervisor = state.Proc.of("bcvk", os.getpid(), group=False)

    def make_record(used: set[int]) -> state.VmRecord:
        return state.VmRecord(
            name=name,
            image=opts.image,
            image_id=info.id,
            ssh_port=free_port(used | {f.host_port for f in opts.ports}),
            forwards=[(f.host_port, f.guest_port) for f in opts.ports],
            memory_mib=opts.memory_mib,
            vcpus=opts.vcpus,
            detached=opts.detach,
            supervisor=supervisor,
            rootless=podman.rootless(),
        )

    vmdir, record = state.create(name, make_record)
    plan = Plan(opts, info, vmdir, record)
    vm = Vm(vmdir, record, owner=True)
    try:
        if opts.log_dir:
            opts.log_dir.directory.mkdir(parents=True, exist_ok=True)
        record.console_log = os.fspath(
            opts.log_dir.directory / "console.txt"
            if opts.log_dir and opts.log_dir.console
            else vmdir.console_log
        )
        launch.prepare(plan)
        assert plan.prepared is not None
        vm.facts = plan.prepared.facts
        plan.qemu_binary = launch.qemu_binary()
        verdict = accel.decide(plan.qemu_binary, plan.prepared.kernel, override=opts.accel)
        record.accel = verdict.accel
        logger.debug("accelerator %s: %s", verdict.accel, verdict.reason)
        key = ssh.generate_key(vmdir.path, comment=f"bcvk-{name}")
        facts = plan.prepared.facts
        routes = credentials.choose_routes(facts.systemd_version, facts.has_cloud_init)
        if forced := os.environ.get("BCVK_SSH_KEY_ROUTES"):
            try:
                routes = credentials.parse_routes(forced)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        injection = credentials.inject_key(
            key.public_text(), routes, hostname=name, systemd_version=facts.systemd_version
        )
        drives = launch.drives(plan)
        seed = launch.seed(plan, injection.nocloud)
        if seed is not None:
            drives = (*drives, seed)
        vmdir.write(record)
        asyncio.run(
            launch.launch(plan, injection.smbios, injection.kernel_args, drives, verdict.accel)
        )
        vm.children = plan.children
        record.phase = "running"
        vmdir.write(record)
        progress = opts.progress if opts.progress is not None else sys.stderr.isatty()
        if opts.detach:
            _confirm_started(vm)
            if opts.binds or opts.add_swap or (opts.log_dir and opts.log_dir.journal):
                # These are set up over SSH, so this detached start waits for it.
                asyncio.run(
                    _wait_ready(vm, opts.ssh_timeout, progress=progress, allow_poweroff=False)
                )
                _after_ready(vm, plan)
            record.supervisor = None
            vmdir.write(record)
            vm.owner = False
            return vm
        asyncio.run(
            _wait_ready(
                vm,
                opts.ssh_timeout,
                progress=progress and not opts.console,
                allow_poweroff=not opts.execute,
            )
        )
        _after_ready(vm, plan)
        return vm
    except GuestPoweredOff:
        vm.stop(graceful=False)
        raise
    except BaseException:
        vm.children = plan.children
        with _signals_deferred():
            for sock in plan.listeners:
                sock.close()
            _teardown(vm, graceful=False, timeout=0)
        raise
    finally:
        for f in plan.logs:
            f.close()


def _confirm_started(vm: Vm, timeout: float = 60.0) -> None:
    """For detached VMs: QEMU answers QMP (its devices, virtiofs included, are up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in vm.children:
            child.poll()
        if not vm.alive():
            qemu_proc = _qemu_child(vm)
            raise _qemu_exit_error(vm, qemu_proc.wait() if qemu_proc else None)
        if qmp.status(vm.dir.qmp) in ("running", "prelaunch"):
            return
        time.sleep(0.2)
    raise WaitTimeout(
        f"QEMU of VM {vm.name} did not answer on its control socket in {timeout:.0f}s"
    )


# ---------------------------------------------------------------- verbs


def run_vm(opts: Options) -> int:
    """`ephemeral run` in the foreground: boot, then run --execute or wait for the end."""
    try:
        vm = _start(opts)
    except GuestPoweredOff:
        logger.info("the VM powered off")
        return 0
    if opts.detach:
        return 0
    with vm:
        if opts.execute:
            status = 0
            for command in opts.execute:
                status = vm.ssh(command, capture=False).returncode
                if status != 0:
                    logger.error("--execute %r exited with status %d", command, status)
                    break
            vm.stop(graceful=True, timeout=30)
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
        raise UsageError("run-ssh cannot detach")
    vm = _start(opts)
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
    found = state.lookup(name)
    if found is None:
        raise NotFoundError(
            f"no ephemeral VM named {name!r}", hint="list them with `bcvk ephemeral ps`"
        )
    d, record = found
    return Vm(d, record, facts=rootfs.entry_for(record.image_id).facts(), owner=False)


def ssh_into(name: str, args: Sequence[str] = (), *, timeout: float = DEFAULT_SSH_TIMEOUT) -> int:
    """`ephemeral ssh NAME [SSH-OPTIONS] [COMMAND…]`; returns ssh's exit status."""
    vm = attach(name)
    options, command = split_ssh_args(args)
    if not ssh.probe(vm.target(connect_timeout=5)):
        asyncio.run(_wait_ready(vm, timeout, progress=sys.stderr.isatty(), allow_poweroff=False))
    tty = None if command else True
    argv = ssh.argv(vm.target(), command, tty=tty, extra=options)
    result = run.run(argv, check=False, capture=False, stdout=1, stdin=0)
    return int(result.returncode)


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

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "image": self.image,
            "state": self.state,
            "ssh_port": self.ssh_port,
            "pid": self.pid,
            "rootfs": self.rootfs,
            "created": int(self.created),
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "detached": self.detached,
            "ports": [f"{h}:{g}" for h, g in self.forwards],
        }


def ps() -> list[VmInfo]:
    """Running ephemeral VMs (stale state is reaped on the way)."""
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
        )
        for _, record in state.scan()
    ]


def rm(name: str, *, force: bool = False) -> bool:
    """Stop VM NAME and remove its state; False if there was none (with FORCE)."""
    existed = state.vm_dir(name).path.exists()
    found = state.lookup(name)
    if found is None:
        if existed and not state.vm_dir(name).path.exists():
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


def rm_all(*, force: bool = True) -> list[str]:
    names = [record.name for _, record in state.scan()]
    for name in names:
        rm(name, force=True)
    return names
