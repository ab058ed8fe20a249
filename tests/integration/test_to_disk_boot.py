"""Disks from `bcvk to-disk` boot under OVMF with plain QEMU, and SSH works.

Boots are slow under TCG (~40–100 s each on a shared 2-core host), so this
module boots twice in all: the disk an unprivileged user built, twice (the
second boot proves a write survives a reboot of the same disk).  Disks root
builds boot in the libvirt tests: every base disk there is one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bcvk.host import accel, firmware, ssh
from bcvk.wait import Deadline, wait_until
from tests.conftest import DEMO_IMAGE, bcvk

BOOT_TIMEOUT = 420.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def booted(disk: Path, key: ssh.KeyPair, workdir: Path, tag: str) -> Iterator[ssh.Target]:
    """Boot DISK (qcow2) under OVMF; yield an SSH target once `ssh true` works."""
    ovmf = firmware.find_ovmf()
    assert ovmf is not None, "OVMF is not installed"
    variables = workdir / f"vars-{tag}.fd"
    shutil.copyfile(ovmf.vars, variables)
    console = workdir / f"console-{tag}.log"
    port = free_port()
    verdict = accel.decide(shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    argv = [
        "qemu-system-x86_64",
        "-accel", verdict.accel, "-machine", "q35", "-m", "2048", "-smp", "2",
        "-nodefaults", "-display", "none", "-serial", f"file:{console}",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf.code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={variables}",
        "-drive", f"file={disk},if=virtio,format=qcow2",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=n0",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip
    if verdict.accel == "kvm":
        argv[3:3] = ["-cpu", "host"]
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = ssh.Target(port=port, key=key.private, connect_timeout=5)
    try:

        def ready() -> bool:
            if qemu.poll() is not None:
                raise AssertionError(f"QEMU exited: {qemu.stderr.read()!r}")  # type: ignore[union-attr]
            return ssh.probe(target)

        deadline = Deadline(BOOT_TIMEOUT)
        try:
            wait_until(ready, deadline, f"SSH of {disk.name}", interval=2)
        except Exception as exc:
            tail = console.read_text(errors="replace")[-3000:] if console.exists() else ""
            raise AssertionError(f"{exc}\n--- console tail ---\n{tail}") from exc
        print(f"{disk.name} ({tag}): SSH answered {deadline.elapsed:.0f}s after QEMU started")
        yield target
    finally:
        if qemu.poll() is None:
            ssh.execute(target, ["systemctl", "poweroff"], timeout=30)
            try:
                qemu.wait(timeout=90)
            except subprocess.TimeoutExpired:
                qemu.kill()
                qemu.wait()
        assert qemu.returncode is not None


def guest(target: ssh.Target, command: str) -> str:
    result = ssh.execute(target, [command], timeout=60)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return str(result.stdout).strip()


def check_guest(target: ssh.Target, karg: str) -> None:
    assert guest(target, "findmnt -no SOURCE,FSTYPE /").split() == ["/dev/vda2", "ext4"]
    assert karg in guest(target, "cat /proc/cmdline").split()
    assert guest(target, "findmnt -no SOURCE /boot/efi") == "/dev/vda1"
    assert len(guest(target, "cat /etc/machine-id")) == 32  # first boot made one


@pytest.fixture
def user_workdir(tmp_path: Path) -> Iterator[Path]:
    work = Path("/var/tmp") / f"bcvk-to-disk-boot-{os.getpid()}"
    work.mkdir(mode=0o755)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_rootless_disk_boots_and_keeps_writes_across_a_reboot(
    rootless_user: str, user_workdir: Path
) -> None:
    shutil.chown(user_workdir, rootless_user)
    key = ssh.generate_key(user_workdir / "key")
    shutil.chown(key.public, rootless_user)
    os.chmod(user_workdir / "key", 0o755)
    out = user_workdir / "out.qcow2"
    karg = "bcvk.rootless=1"
    argv = ["to-disk", DEMO_IMAGE, str(out), "--karg", karg,
            "--root-ssh-authorized-keys", str(key.public)]  # fmt: skip
    built = bcvk(*argv, user=rootless_user)
    assert built.returncode == 0, built.stderr
    assert out.stat().st_uid != 0
    again = bcvk(*argv, user=rootless_user)
    assert "Reusing existing cached disk image at:" in again.stderr
    # nothing of the user's namespace is left behind: only the disk
    assert sorted(p.name for p in user_workdir.iterdir()) == ["key", "out.qcow2"]

    with booted(out, key, user_workdir, "first") as target:
        check_guest(target, karg)
        assert guest(target, "systemctl is-system-running --wait || true") in (
            "running", "degraded",
        )  # fmt: skip
        guest(target, "touch /var/bcvk-survives && echo written > /root/note && sync")
    with booted(out, key, user_workdir, "second") as target:
        assert guest(target, "cat /root/note") == "written"
        assert guest(target, "test -e /var/bcvk-survives && echo yes") == "yes"
