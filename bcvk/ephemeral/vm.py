"""A running ephemeral VM: reaching it, waiting for it, and tearing it down.

``Vm`` wraps the registry record of a VM and the processes this bcvk started
for it.  Readiness is a real ``ssh … true``; teardown is QMP powerdown, then
quit, then signals, with every step bounded, and reaps the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from bcvk import run
from bcvk.ephemeral import registry
from bcvk.ephemeral.options import DEFAULT_SSH_TIMEOUT
from bcvk.errors import BcvkError, WaitTimeout
from bcvk.guest import report
from bcvk.guest.stall import Watch
from bcvk.host import qmp, ssh
from bcvk.image.facts import TreeFacts
from bcvk.log import console_tail, file_tail, logger
from bcvk.run import signals_deferred


def kept_log_hint(vm: Vm) -> str:
    """Where to read the console after a failed start.

    A failed start removes the VM's state directory, so a log inside it must
    not be named: only one under the user's --log-dir survives.
    """
    if vm.dir.path in vm.console_log.parents:
        return "rerun with --log-dir DIR to keep the whole console log"
    if vm.console_log.is_file() and vm.console_log.stat().st_size:
        return f"console log: {vm.console_log}"
    return "the guest wrote nothing on its console: the kernel never started"


def no_ssh_hint(facts: TreeFacts | None) -> str:
    if facts is not None and not facts.sshd_installed:
        return "the image has no sshd (/usr/sbin/sshd is missing): install openssh-server in it"
    if facts is not None and not facts.sshd_enabled:
        return "sshd is installed in the image but not enabled: `systemctl enable sshd` (or ssh)"
    return "a slow host may need a longer --ssh-timeout"


class Vm:
    """A running ephemeral VM.

    Owned VMs (started in this process) are torn down by ``stop()`` or when
    the ``with`` block ends; VMs found by ``attach()`` are only stopped when
    asked.
    """

    def __init__(
        self,
        vmdir: registry.VmDir,
        record: registry.VmRecord,
        *,
        facts: TreeFacts | None = None,
        children: Sequence[run.Process] = (),
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
        asyncio.run(wait_for_ssh(self, timeout, progress=progress, allow_poweroff=False))

    # -- lifecycle
    def stop(self, *, graceful: bool = True, timeout: float = 30.0) -> None:
        """Power the VM off (ACPI, then QMP quit, SIGTERM, SIGKILL) and remove its registry."""
        if self.stopped:
            return
        with signals_deferred():
            teardown(self, graceful=graceful, timeout=timeout)
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


def wait_exit(vm: Vm, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in vm.children:
            child.poll()
        if not vm.alive():
            return True
        time.sleep(0.1)
    return not vm.alive()


def teardown(vm: Vm, *, graceful: bool, timeout: float) -> None:
    record = vm.record
    if record.phase != "stopping" and vm.dir.path.exists():
        record.phase = "stopping"
        with contextlib.suppress(OSError):
            vm.dir.write(record)
    if vm.alive():
        if graceful:
            logger.debug("powering %s down", vm.name)
            if qmp.powerdown(vm.dir.qmp):
                wait_exit(vm, timeout)
        if vm.alive() and qmp.quit(vm.dir.qmp):
            wait_exit(vm, 5.0)
        if vm.alive() and record.qemu is not None:
            logger.debug("QEMU of %s did not quit; terminating it", vm.name)
            registry.terminate([record.qemu], timeout=5.0)
    # virtiofsd exits by itself once QEMU hangs up; anything else gets signals.
    registry.terminate(list(record.helpers), timeout=3.0)
    for child in vm.children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)
    registry.reap(vm.dir, record)


class StatusLine:
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


def qemu_child(vm: Vm) -> run.Process | None:
    """Our Popen of the VM's QEMU (polled, so that its exit status is known)."""
    pid = vm.record.qemu.pid if vm.record.qemu else -1
    for child in vm.children:
        if child.pid == pid:
            child.poll()
            return child
    return None


class GuestPoweredOff(Exception):
    """The guest shut down before SSH answered (e.g. systemd.unit=poweroff.target)."""


def qemu_exit_error(vm: Vm, returncode: int | None) -> BcvkError:
    stderr = file_tail(vm.dir.qemu_log, 8)
    tail = console_tail(vm.console_log, 12)
    if stderr:
        message = f"QEMU exited during boot (status {returncode}): " + stderr[-1]
        detail = "\n".join("  qemu: " + line for line in stderr)
    else:
        message = f"VM {vm.name} stopped during boot (QEMU status {returncode})"
        detail = "\n".join("  console: " + line for line in tail)
    panic = any("Kernel panic" in line for line in tail)
    hint = kept_log_hint(vm)
    if any("guest memory" in line or "phys-bits" in line for line in stderr):
        hint = f"QEMU cannot give the guest {vm.record.memory_mib} MiB here: ask for less --memory"
    elif panic:
        hint = (
            "the guest kernel panicked; see the console lines above (wrong root=, missing driver?)"
        )
    return BcvkError(message + ("\n" + detail if detail else ""), hint=hint)


def boot_report(vm: Vm) -> report.BootReport | None:
    """The guest's boot report, once it has all arrived (``bcvk.guest.report``)."""
    try:
        return report.parse(vm.dir.boot_report.read_text(errors="replace"))
    except OSError:
        return None


def boot_problem(vm: Vm) -> str | None:
    """Why the guest's SSH server will not answer, as its boot report says, or None."""
    got = boot_report(vm)
    return got.ssh_problem() if got is not None else None


async def wait_for_ssh(
    vm: Vm,
    timeout: float,
    *,
    progress: bool,
    allow_poweroff: bool,
    kernel: Watch | None = None,
) -> None:
    """Poll ``ssh … true`` until it succeeds, QEMU exits, or TIMEOUT passes.

    KERNEL, a watch on the console, raises ``KernelStalled`` for a boot that
    stopped in the kernel, long before TIMEOUT would.
    """
    target = vm.target(connect_timeout=5)
    bar = StatusLine(progress, f"Booting {vm.name}…", vm.console_log)
    deadline = time.monotonic() + timeout
    probe: asyncio.Task[bool] | None = None
    try:
        while True:
            qemu_proc = qemu_child(vm)
            if not vm.alive():
                code = qemu_proc.wait() if qemu_proc is not None else None
                tail = console_tail(vm.console_log, 30)
                powered_off = code == 0 and any(
                    "reboot: Power down" in line or "Powering off" in line for line in tail
                )
                if powered_off and allow_poweroff:
                    raise GuestPoweredOff()
                raise qemu_exit_error(vm, code)
            if probe is None:
                probe = asyncio.ensure_future(asyncio.to_thread(ssh.probe, target))
            elif probe.done():
                if probe.result():
                    return
                probe = None
                continue
            if (problem := boot_problem(vm)) is not None:
                raise BcvkError(
                    f"VM {vm.name} will not answer SSH: {problem}",
                    hint="`bcvk ephemeral run --execute CMD` runs commands without SSH; "
                    + kept_log_hint(vm),
                )
            if kernel is not None:
                kernel.check()
            if time.monotonic() > deadline:
                tail = console_tail(vm.console_log, 12)
                lines = "\n".join("  console: " + line for line in tail) or "  (console is empty)"
                got = boot_report(vm)
                if got is not None and not got.key_present:
                    lines += "\n  the guest reports: the SSH key did not arrive"
                    lines += "".join(f"; {p}" for p in got.problems)
                raise WaitTimeout(
                    f"VM {vm.name} did not answer SSH on 127.0.0.1:{vm.ssh_port} within "
                    f"{timeout:.0f}s; last console lines:\n{lines}",
                    hint=f"{no_ssh_hint(vm.facts)}; {kept_log_hint(vm)}",
                )
            bar.update()
            await asyncio.sleep(0.5)
    finally:
        bar.clear()
        if probe is not None and not probe.done():
            # A probe in flight finishes on its own (ssh has a connect timeout).
            probe.cancel()


def confirm_started(vm: Vm, timeout: float = 60.0) -> None:
    """For detached VMs: QEMU answers QMP (its devices, virtiofs included, are up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in vm.children:
            child.poll()
        if not vm.alive():
            qemu_proc = qemu_child(vm)
            raise qemu_exit_error(vm, qemu_proc.wait() if qemu_proc else None)
        if qmp.status(vm.dir.qmp) in ("running", "prelaunch"):
            return
        time.sleep(0.2)
    raise WaitTimeout(
        f"QEMU of VM {vm.name} did not answer on its control socket in {timeout:.0f}s",
        hint="the host may be overloaded; rerun with --debug to see QEMU's messages",
    )
