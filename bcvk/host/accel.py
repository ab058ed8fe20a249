"""Choose KVM only where it really runs a Linux guest, else TCG.

``/dev/kvm`` existing — even KVM_CREATE_VM succeeding — is no proof: on some
hosts a real kernel dies with "KVM internal error … emulation failure".  The
probe boots a real kernel with no root filesystem under KVM and waits for the
panic it prints once fully initialised; the verdict is cached per host boot.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bcvk import paths, run
from bcvk.errors import UsageError
from bcvk.host.proc import boot_id
from bcvk.log import logger

ACCELS = ("kvm", "tcg")
# Printed once the kernel has initialised everything and looked for a root.
_MARKERS = ("Kernel panic", "VFS: Unable to mount root", "Run /init as init process")
# A real KVM boots a kernel to its root-mount panic in 1–3 s.
PROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class Verdict:
    accel: str
    reason: str
    probed_kernel: str | None = None


def cache_file() -> Path:
    return paths.cache_dir() / f"accel-{boot_id()}.json"


def kvm_usable() -> str | None:
    """Why /dev/kvm cannot be used, or None if it opens read-write."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return "/dev/kvm does not exist"
    except PermissionError:
        return "no permission to open /dev/kvm (join the kvm group)"
    except OSError as exc:
        return f"/dev/kvm cannot be opened: {exc.strerror}"
    os.close(fd)
    return None


def host_kernels() -> list[Path]:
    found = sorted(Path("/boot").glob("vmlinuz-*"))
    found += sorted(Path("/usr/lib/modules").glob("*/vmlinuz"))
    return [k for k in found if os.access(k, os.R_OK)]


def probe_argv(qemu: str, kernel: Path) -> list[str]:
    return [
        qemu,
        "-accel", "kvm",
        "-cpu", "host",
        "-m", "256",
        "-smp", "1",
        "-nodefaults",
        "-no-reboot",
        "-display", "none",
        "-serial", "stdio",
        "-kernel", os.fspath(kernel),
        "-append", "console=ttyS0 panic=-1 root=/dev/bcvk-probe-none loglevel=4",
    ]  # fmt: skip


def probe_kvm(qemu: str, kernel: Path, timeout: float = PROBE_TIMEOUT) -> Verdict:
    why = kvm_usable()
    if why:
        return Verdict("tcg", why)
    with tempfile.TemporaryFile() as out:
        proc = run.spawn(probe_argv(qemu, kernel), stdout=out, stderr=subprocess.STDOUT)
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        out.seek(0)
        text = out.read().decode(errors="replace")
    if any(marker in text for marker in _MARKERS):
        return Verdict("kvm", "a Linux kernel booted under KVM", os.fspath(kernel))
    detail = next((ln.strip() for ln in text.splitlines() if "KVM" in ln), "")
    reason = "a Linux kernel failed under KVM"
    if timed_out:
        reason = f"a Linux kernel did not boot under KVM within {timeout:.0f}s"
    if detail:
        reason += f" ({detail})"
    return Verdict("tcg", reason, os.fspath(kernel))


def cached() -> Verdict | None:
    try:
        data = json.loads(cache_file().read_text())
        return Verdict(**data)
    except (OSError, ValueError, TypeError):
        return None


def store(verdict: Verdict) -> None:
    target = cache_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    paths.write_atomic(target, json.dumps(verdict.__dict__), 0o644)


def decide(
    qemu: str, kernel: Path | None = None, override: str | None = None, *, refresh: bool = False
) -> Verdict:
    """The accelerator to use: override, else cached probe, else a new probe."""
    choice = override or os.environ.get("BCVK_ACCEL")
    if choice:
        if choice not in ACCELS:
            raise UsageError(f"unknown accelerator {choice!r}", hint="use kvm or tcg")
        return Verdict(choice, "requested by --accel/BCVK_ACCEL")
    if not refresh and (verdict := cached()) is not None:
        return verdict
    why = kvm_usable()
    if why:
        return Verdict("tcg", why)
    candidates = host_kernels() + ([kernel] if kernel else [])
    if not candidates:
        # Not cached: the next call may have a kernel to try.
        return Verdict("tcg", "no kernel available to test KVM with")
    logger.info("Testing whether KVM runs a Linux guest on this host…")
    verdict = probe_kvm(qemu, candidates[0])
    store(verdict)
    return verdict
