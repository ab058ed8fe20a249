"""Warm start: an ephemeral VM from a saved, SSH-ready machine.

The first VM of a configuration boots cold.  Once SSH answers, ``save``
readies the guest (``bcvk.guest.warm``: an agent on the control port, the
VM's key removed), pauses it, writes its whole state to the image's cache
entry with QEMU's migration (``bcvk.host.qmp.save_state``) and resumes it;
``hand_in`` then gives the VM its key back and its command runs.  Every
later VM of the same configuration starts a QEMU with the same machine and
``-incoming`` that state: ``restore`` waits for it to load, resumes it and
hands in the VM's own key, clock and hostname; a new VM generation ID makes
its kernel reseed its RNG.

The configuration is the snapshot's key (``snapshot_key``): QEMU's whole
command line with the per-VM parts left out (ports, names, paths of
sockets and logs, SSH key credentials), the identity of every file it
reads (QEMU and its ROMs, kernel, initramfs, root image), the agent and
bcvk's version.
A changed input gives another key, so an old snapshot is never restored
into a changed machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import bcvk
from bcvk import paths
from bcvk.ephemeral import cache
from bcvk.ephemeral.launch import Machine
from bcvk.ephemeral.options import Options, RootfsMode, WarmMode
from bcvk.ephemeral.vm import Vm
from bcvk.errors import BcvkError
from bcvk.guest import warm as guest
from bcvk.host import qemu, qmp, ssh
from bcvk.host.qemu import RootfsKind
from bcvk.log import logger
from bcvk.values import Accel

# Bumped when what a snapshot holds, or how it is restored, changes.
FORMAT = 1
KEY_ROUTES_ENV = "BCVK_SSH_KEY_ROUTES"


class Unusable(Exception):
    """A snapshot that did not restore into a working VM (the message says why)."""


@dataclass(frozen=True)
class Plan:
    """How one VM starts: ``cold``, ``save`` (cold, then snapshot) or ``restore``."""

    mode: str
    reason: str
    snapshot: cache.Snapshot | None = None

    @property
    def warm_devices(self) -> bool:
        """Whether QEMU gets the control port and a VM generation ID."""
        return self.mode != "cold"

    def message(self) -> str:
        """The one line on stderr that says which start happens and why."""
        if self.mode == "restore":
            assert self.snapshot is not None
            return f"warm start: restoring snapshot {self.snapshot.key[:12]}"
        if self.mode == "save":
            return f"cold boot: {self.reason}; saving a snapshot once SSH answers"
        return f"cold boot: {self.reason}"


def option_reason(opts: Options) -> str | None:
    """Why OPTS cannot start warm, known before the image is read; None if they can."""
    if opts.warm is WarmMode.off:
        return "--warm off"
    if opts.binds:
        return "--bind/--ro-bind shares cannot be restored"
    if opts.disks:
        return "--mount-disk-file disks cannot be restored"
    if opts.add_swap:
        return "--add-swap cannot be restored"
    if opts.console:
        return "--console shows the boot"
    if opts.execute:
        return "--execute runs its commands as the guest boots"
    if opts.cloud_init:
        return "--cloud-init gets a seed disk of its own per VM"
    if opts.systemd_units:
        return "--systemd-units are active from the start of the boot"
    if opts.log_dir and opts.log_dir.journal:
        return "--log-dir journal= records the journal from the start of the boot"
    if opts.rootfs is RootfsMode.virtiofs:
        return "a virtiofs root cannot be restored (QEMU cannot save vhost-user devices)"
    if os.environ.get(KEY_ROUTES_ENV):
        return f"{KEY_ROUTES_ENV} chooses how the key gets in"
    return None


def machine_reason(machine: Machine) -> str | None:
    """Why this machine cannot start warm, once the image's facts are known."""
    if machine.transport is not RootfsKind.block:
        return "a virtiofs root cannot be restored (QEMU cannot save vhost-user devices)"
    if machine.facts.has_cloud_init:
        return "the image runs cloud-init, which gets a seed disk of its own per VM"
    return None


def snapshot_key(spec: qemu.QemuSpec) -> str:
    """The configuration SPEC describes, as a name for its snapshot."""
    shape = dataclasses.replace(
        spec,
        ssh_port=0,
        forwards=(),
        smbios=(),
        ports=tuple(dataclasses.replace(p, path="") for p in spec.ports),
        console_log=None,
        console_on_stdio=False,
        qmp_fd=0,
        qmp_socket=None,
        name=None,
        control_fd=0,
        vmgenid=True,
        incoming_fd=None,
    )
    binary = shutil.which(spec.binary) or spec.binary
    files = [
        binary,
        *map(str, qemu.rom_files(binary)),
        spec.kernel,
        spec.initrd,
        *(d.path for d in spec.drives),
    ]
    identities = {}
    for path in files:
        if path is None:
            continue
        st = os.stat(path)
        # Size and mtime: every file here is replaced by a rename or a package
        # upgrade when it changes (device and inode numbers are not stable
        # across overlay mounts, which would make a snapshot never match).
        identities[os.path.realpath(path)] = [st.st_size, st.st_mtime_ns]
    data = {
        "format": FORMAT,
        "bcvk": bcvk.__version__,
        "argv": qemu.argv(shape),
        "files": identities,
        "agent": hashlib.sha256(guest.AGENT.encode()).hexdigest(),
        "host_cpu": host_cpu() if spec.accel is Accel.kvm else None,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]


def host_cpu() -> str:
    """The host CPU a KVM guest sees (``-cpu host``): QEMU does not check it on load."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    first = text.split("\n\n", 1)[0]
    wanted = ("vendor_id", "cpu family", "model", "model name", "stepping", "microcode", "flags")
    lines = [line for line in first.splitlines() if line.split(":", 1)[0].strip() in wanted]
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return f"{os.uname().release}:{digest}"


@contextlib.contextmanager
def _try_lock(snapshot: cache.Snapshot) -> Iterator[bool]:
    """The snapshot's lock, if nobody holds it (False: another VM is saving).

    The directory is made first: `--warm refresh` on a cache that never held
    a snapshot has none yet, and a lock cannot be created in nothing.
    """
    snapshot.entry.warm.mkdir(mode=0o700, parents=True, exist_ok=True)
    with paths.locked(snapshot.lock, blocking=False, remove=True) as free:
        yield free


def plan(opts: Options, reason: str | None, snapshot: cache.Snapshot | None) -> Plan:
    """Decide the start; REASON (if any) is why this VM cannot start warm."""
    if reason is not None or snapshot is None:
        return Plan("cold", reason or "no snapshot")
    if opts.warm is WarmMode.refresh:
        with _try_lock(snapshot) as free:
            if free:  # else another VM is saving a new one right now
                snapshot.remove()
        if opts.detach:
            return Plan("cold", "--warm refresh removed the snapshot (a detached VM saves none)")
        return Plan("save", "--warm refresh", snapshot)
    if snapshot.usable():
        return Plan("restore", "", snapshot)
    why = "no snapshot yet"
    if snapshot.state.exists() or snapshot.meta.exists():
        with _try_lock(snapshot) as free:
            if free:  # not being written: a left-over of an interrupted save
                snapshot.remove()
                why = "the snapshot was incomplete"
            else:
                why = "the snapshot is being saved by another VM"
    if opts.detach:
        return Plan("cold", f"{why} (a detached VM does not save one)")
    return Plan("save", why, snapshot)


# ---------------------------------------------------------------- saving


def save(vm: Vm, snapshot: cache.Snapshot, public_key: str, image: str) -> None:
    """Snapshot VM (SSH-ready, untouched by its user) and give it its key back.

    A snapshot that cannot be made is a warning: the VM goes on.  Two first
    VMs of one configuration save once; the other goes on without saving.
    """
    with _try_lock(snapshot) as free:
        if not free or snapshot.usable():
            logger.info("not saving a snapshot: another VM has saved or is saving it")
            return
        # Under the lock no one else writes this key: a temporary file left
        # is a killed saver's.
        for stale in snapshot.entry.warm.glob(f".{snapshot.key}.*.tmp"):
            stale.unlink(missing_ok=True)
        start = time.monotonic()
        try:
            ready = vm.ssh(guest.prepare_script(public_key), timeout=120)
            failed = None if ready.returncode == 0 else (ready.stderr or "").strip()
            failed = failed if failed is None else (failed.splitlines() or [""])[-1]
        except BcvkError as exc:  # ssh timed out
            failed = str(exc).splitlines()[0]
        if failed is not None:
            logger.warning("could not save a warm-start snapshot: %s", failed or "ssh failed")
            # The script may have got as far as removing the key: the agent,
            # if it runs, gives it back; if it does not, the key is still there.
            with contextlib.suppress(Unusable):
                hand_in(vm, public_key, timeout=10)
            return
        try:
            size = _write_state(vm, snapshot)
            meta = {
                "key": snapshot.key,
                "size": size,
                "created": time.time(),
                "image": image,
                "bcvk": bcvk.__version__,
            }
            paths.write_atomic(snapshot.meta, json.dumps(meta), 0o600)
            logger.info(
                "saved warm-start snapshot %s (%s) in %.1fs",
                snapshot.key[:12],
                _mib(size),
                time.monotonic() - start,
            )
        except (qmp.MigrationError, OSError) as exc:
            snapshot.remove()
            logger.warning("could not save a warm-start snapshot: %s", exc)
        finally:
            try:
                hand_in(vm, public_key)
            except Unusable as exc:
                raise BcvkError(
                    f"VM {vm.name} did not take its key back after the snapshot: {exc}",
                    hint="run it again with --warm off, and report this",
                ) from None


def _write_state(vm: Vm, snapshot: cache.Snapshot) -> int:
    tmp = snapshot.state.with_name(f".{snapshot.key}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            qmp.save_state(vm.dir.qmp, fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        size = tmp.stat().st_size
        tmp.replace(snapshot.state)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"


# ---------------------------------------------------------------- restoring


def open_state(snapshot: cache.Snapshot) -> int:
    """A descriptor of the saved state for QEMU's ``-incoming fd:N``."""
    try:
        fd = os.open(snapshot.state, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise Unusable(f"cannot open {snapshot.state}: {exc.strerror}") from None
    # Its last use, for `cache prune --days`.
    with contextlib.suppress(OSError):
        os.utime(snapshot.meta)
    return fd


def resume(vm: Vm) -> None:
    """Wait for the restored VM's QEMU to load its state, and run it."""
    try:
        qmp.resume_incoming(vm.dir.qmp, alive=vm.alive, timeout=120)
    except qmp.MigrationError as exc:
        raise Unusable(str(exc)) from None


def hand_in(
    vm: Vm,
    public_key: str,
    timeout: float = 60.0,
    *,
    resume: Callable[[], None] | None = None,
) -> None:
    """Give the guest's agent VM's key, name and the host's clock; wait for its "ok".

    With RESUME (a restore), key and name are queued on the control port
    while QEMU still loads the state, RESUME runs the machine, and only then
    is the clock sent, so that it is current.
    """
    deadline = time.monotonic() + timeout
    try:
        sock = qmp.unix_connect(vm.dir.control, timeout)
    except OSError as exc:
        raise Unusable(f"no control socket: {exc.strerror}") from None
    with sock:
        sock.setblocking(True)
        sock.settimeout(timeout)
        try:
            sock.sendall(guest.identity_lines(public_key, vm.name))
            if resume is not None:
                resume()
                deadline = time.monotonic() + timeout  # loading has its own limit
            sock.sendall(guest.go_lines(time.time()))
            answer = b""
            while b"\n" not in answer:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                chunk = sock.recv(256)
                if not chunk:
                    raise Unusable("the control port closed")
                answer += chunk
        except TimeoutError:
            raise Unusable(f"the guest's agent did not answer in {timeout:.0f}s") from None
        except OSError as exc:
            raise Unusable(f"control port: {exc.strerror or exc}") from None
    if answer.split(b"\n", 1)[0].strip() != guest.READY.encode():
        raise Unusable(f"the guest's agent answered {answer[:40]!r}")


def wait_banner(vm: Vm, timeout: float, first: socket.socket | None = None) -> None:
    """Until the restored VM's sshd greets on its forwarded port.

    FIRST, a connection opened before the guest ran, is read first: its
    sshd answers it while the agent takes the key.
    """
    deadline = time.monotonic() + timeout
    if first is not None:
        with first:
            try:
                first.settimeout(max(0.1, min(10.0, timeout)))
                if first.recv(64).startswith(b"SSH-"):
                    return
            except OSError:
                pass
    while not ssh.banner(vm.ssh_port, timeout=5.0):
        if not vm.alive():
            raise Unusable("QEMU exited after the restore")
        if time.monotonic() > deadline:
            raise Unusable(f"sshd did not answer on port {vm.ssh_port} in {timeout:.0f}s")
        time.sleep(0.1)


def discard(snapshot: cache.Snapshot, why: str) -> None:
    """Remove a snapshot that failed to restore, so the next VM saves a new one."""
    logger.warning("warm start failed (%s); removing the snapshot and booting cold", why)
    with _try_lock(snapshot) as free:
        if free:
            snapshot.remove()
