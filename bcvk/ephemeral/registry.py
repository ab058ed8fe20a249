"""Per-VM state directories for ephemeral VMs, and the reaping of stale ones.

Each VM has ``runtime_dir()/ephemeral/<name>/`` (0700) holding its SSH key,
QMP socket, console log and ``vm.json``.  The files are a cache: the live
processes are the truth.  A record whose processes are gone is stale and is
reaped — leftover helpers killed, a leaked image mount dropped, files removed —
by the next command that lists or touches VMs.

Processes are identified by pid *and* start time (``/proc/PID/stat`` field
22), so a recycled pid is never mistaken for our QEMU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bcvk import paths
from bcvk.errors import BcvkError
from bcvk.host import podman
from bcvk.host.proc import process_group, start_time
from bcvk.log import logger
from bcvk.values import is_vm_name, validate_vm_name

_REAPING = ".reaping-"
_MOUNTED = ("mounting", "mounted")
RECORD = "vm.json"
LOCK = ".lock"
SCHEMA = 1


def root() -> Path:
    return paths.runtime_dir() / "ephemeral"


def ensure_root() -> Path:
    paths.ensure_private_dir(paths.runtime_dir())
    return paths.ensure_private_dir(root())


# ---------------------------------------------------------------- processes


# Every process bcvk starts for a VM carries its VM's token in this variable:
# after the pid is reused, a group with that number is someone else's.
TOKEN_VAR = "BCVK_VM_TOKEN"


def carries(pid: int, token: str) -> bool:
    """Whether process PID was started by bcvk for the VM with TOKEN."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False  # gone, or not ours to read: not ours to signal either
    return f"{TOKEN_VAR}={token}".encode() in environ.split(b"\0")


@dataclass(frozen=True)
class Proc:
    """A child we started: pid + start time; ``group`` when it leads its own group.

    ``token`` is the VM's marker in the child's environment (``TOKEN_VAR``);
    only processes that carry it are ever signalled as members.
    """

    role: str
    pid: int
    started: int
    group: bool = True
    token: str = ""

    def alive(self) -> bool:
        return start_time(self.pid) == self.started

    def members(self) -> list[int]:
        """Live processes of our group (the leader may be gone, helpers not)."""
        if not self.group:
            return [self.pid] if self.alive() and self._ours(self.pid) else []
        found: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if process_group(pid) != self.pid:
                continue
            began = start_time(pid)
            # Group members started no earlier than the leader we recorded.
            if began is not None and began >= self.started and self._ours(pid):
                found.append(pid)
        return found

    def _ours(self, pid: int) -> bool:
        # Records written before tokens existed are judged by start time alone.
        return not self.token or carries(pid, self.token)

    @classmethod
    def of(cls, role: str, pid: int, group: bool = True, token: str = "") -> Proc:
        began = start_time(pid)
        return cls(role, pid, began if began is not None else -1, group, token)


def signal_proc(proc: Proc, sig: int) -> bool:
    """Send SIG to PROC (its whole group when it has one); True if any got it."""
    sent = False
    for pid in proc.members():
        try:
            os.kill(pid, sig)
            sent = True
        except ProcessLookupError:
            pass
        except PermissionError:
            logger.debug("no permission to signal pid %d", pid)
    return sent


def terminate(procs: list[Proc], timeout: float = 5.0) -> None:
    """SIGTERM, wait up to TIMEOUT, then SIGKILL whatever is left."""
    live = [p for p in procs if p.members()]
    for p in live:
        signal_proc(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.members() for p in live):
        time.sleep(0.05)
    for p in live:
        if p.members():
            logger.debug("%s (pid %d) ignored SIGTERM; killing it", p.role, p.pid)
            signal_proc(p, signal.SIGKILL)


# ---------------------------------------------------------------- records


@dataclass
class VmRecord:
    name: str
    image: str
    image_id: str = ""
    created: float = field(default_factory=time.time)
    rootfs: str = ""
    ssh_port: int = 0
    forwards: list[tuple[int, int]] = field(default_factory=list)
    memory_mib: int = 0
    vcpus: int = 0
    accel: str = ""
    detached: bool = False
    # bcvk process supervising a foreground VM (None once detached)
    supervisor: Proc | None = None
    qemu: Proc | None = None
    helpers: list[Proc] = field(default_factory=list)
    # "mounting" is written before `podman image mount` so that a bcvk killed
    # in between still has its mount reaped.
    mount: str | None = None
    mount_state: str | None = None
    rootless: bool = False
    files: list[str] = field(default_factory=list)  # outside the state dir, removed on reap
    console_log: str = ""
    phase: str = "starting"  # starting → running → stopping
    start: str = "cold"  # "cold" (booted) or "warm" (restored from a snapshot)
    project: str = ""  # Options.project
    labels: list[str] = field(default_factory=list)  # Options.labels
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    schema: int = SCHEMA

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmRecord:
        raw = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        for key in ("supervisor", "qemu"):
            if raw.get(key) is not None:
                raw[key] = Proc(**raw[key])
        raw["helpers"] = [Proc(**h) for h in raw.get("helpers") or []]
        raw["forwards"] = [tuple(f) for f in raw.get("forwards") or []]
        return cls(**raw)

    def status(self) -> str:
        """``running``, ``starting`` (foreground bcvk still setting up) or ``stale``."""
        if self.start == "warm" and self.supervisor is not None and not self.supervisor.alive():
            # A restore whose bcvk died before handing the VM over: its
            # machine may still be paused, or running with no key in it.
            return "stale"
        if self.qemu is not None and self.qemu.alive():
            return "running" if self.phase != "stopping" else "stopping"
        if self.supervisor is not None and self.supervisor.alive():
            return "starting" if self.qemu is None else "stopping"
        return "stale"


_WRITE_LOCK = threading.Lock()


@dataclass(frozen=True)
class VmDir:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def record_file(self) -> Path:
        return self.path / RECORD

    @property
    def key(self) -> Path:
        return self.path / "id_ed25519"

    @property
    def qmp(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def control(self) -> Path:
        """The warm-start control port's socket (``bcvk.ephemeral.warm``)."""
        return self.path / "ctl.sock"

    @property
    def console_log(self) -> Path:
        return self.path / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.path / "qemu.log"

    @property
    def boot_report(self) -> Path:
        """What the guest's boot report port writes (``bcvk.guest.report``)."""
        return self.path / "boot-report.txt"

    def execute(self, stream: str) -> Path:
        """--execute's stdout, stderr or status, as the guest's ports write them."""
        return self.path / f"execute.{stream}"

    def socket(self, index: int) -> Path:
        # Short names: sun_path holds 107 bytes, and QEMU and virtiofsd bind
        # by path when descriptors cannot be passed (rootless).
        return self.path / f"fs{index}.sock"

    def read(self) -> VmRecord | None:
        try:
            return VmRecord.from_json(json.loads(self.record_file.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            logger.debug("unreadable record %s: %s", self.record_file, exc)
            return None

    def write(self, record: VmRecord) -> None:
        # The launcher writes from the main thread (spawned pids) and from the
        # image-mount worker thread at once: serialise, and give each writer
        # its own temporary name (write_atomic) so no rename steals another's.
        with _WRITE_LOCK:
            paths.write_atomic(self.record_file, json.dumps(record.to_json(), indent=1))


@contextlib.contextmanager
def registry_lock() -> Iterator[None]:
    """Serialises creating, listing and reaping VM directories."""
    with paths.locked(ensure_root() / LOCK):
        yield


def vm_dir(name: str) -> VmDir:
    return VmDir(root() / validate_vm_name(name))


def create(name: str, make_record: Callable[[set[int]], VmRecord]) -> tuple[VmDir, VmRecord]:
    """Reserve NAME and write its first record, atomically under the registry lock.

    MAKE_RECORD gets the host ports other VMs hold, so that VMs started at
    the same moment never pick the same port.
    """
    with registry_lock():
        d = vm_dir(name)
        # Reaps stale entries (ours included: a dir without a record was left
        # by a bcvk that died, since records are written under this lock).
        others = _scan_unlocked(prune=True)
        try:
            d.path.mkdir(mode=0o700)
        except FileExistsError:
            raise BcvkError(
                f"an ephemeral VM named {name!r} already exists",
                hint=f"pick another --name, or remove it with `bcvk ephemeral rm -f {name}`",
            ) from None
        try:
            record = make_record(_used_ports(others))
            d.write(record)
        except BaseException:
            shutil.rmtree(d.path, ignore_errors=True)
            raise
        return d, record


def reap(d: VmDir, record: VmRecord | None = None) -> None:
    """Undo everything a VM left: processes, image mount, outside files, its dir.

    Two processes may reap the same VM (``rm`` and the foreground bcvk that
    started it); renaming the directory first makes exactly one of them do it,
    so an image mount is never dropped twice.
    """
    record = record if record is not None else d.read()
    if d.name.startswith("."):
        claimed = d.path  # a claim left by a reaper that died
    else:
        claimed = d.path.with_name(f".{d.name}{_REAPING}{os.getpid()}")
        try:
            os.rename(d.path, claimed)
        except FileNotFoundError:
            return  # someone else is reaping it
        except OSError as exc:
            logger.debug("cannot claim %s for reaping: %s", d.path, exc)
            return
    if record is not None:
        procs = [p for p in (record.qemu, *record.helpers) if p is not None]
        terminate(procs, timeout=3.0)
        if record.mount and record.mount_state in _MOUNTED:
            try:
                podman.unmount_image(record.mount)
            except BcvkError as exc:
                logger.warning("could not unmount image of VM %s: %s", record.name, exc)
        for extra in record.files:
            with contextlib.suppress(FileNotFoundError):
                Path(extra).unlink()
    shutil.rmtree(claimed, ignore_errors=True)
    logger.debug("reaped state of VM %s", d.name)


def _abandoned_claim(entry: Path) -> bool:
    """A ``.NAME.reaping-PID`` directory whose reaper is gone."""
    if not entry.name.startswith(".") or _REAPING not in entry.name:
        return False
    pid = entry.name.rsplit(_REAPING, 1)[1]
    return not pid.isdigit() or not Path(f"/proc/{pid}").exists()


def scan(*, prune: bool = True) -> list[tuple[VmDir, VmRecord]]:
    """Every VM whose processes are alive; stale ones are reaped on the way."""
    if not root().is_dir():
        return []
    with registry_lock():
        return _scan_unlocked(prune=prune)


def _scan_unlocked(*, prune: bool) -> list[tuple[VmDir, VmRecord]]:
    base = root()
    found: list[tuple[VmDir, VmRecord]] = []
    for entry in sorted(base.iterdir()):
        if prune and entry.is_dir() and _abandoned_claim(entry):
            claim = VmDir(entry)
            reap(claim, claim.read())
            continue
        if not entry.is_dir() or not is_vm_name(entry.name):
            continue
        d = VmDir(entry)
        record = d.read()
        if record is None:
            # A directory without a record: a bcvk died while creating it.
            if prune:
                reap(d, None)
            continue
        if record.status() == "stale":
            if prune:
                logger.debug("VM %s is gone; removing its state", record.name)
                reap(d, record)
            continue
        found.append((d, record))
    return found


def lookup(name: str) -> tuple[VmDir, VmRecord] | None:
    validate_vm_name(name)
    for d, record in scan():
        if d.name == name:
            return d, record
    return None


def _used_ports(vms: list[tuple[VmDir, VmRecord]]) -> set[int]:
    ports: set[int] = set()
    for _, record in vms:
        ports.add(record.ssh_port)
        ports.update(host for host, _ in record.forwards)
    return ports
