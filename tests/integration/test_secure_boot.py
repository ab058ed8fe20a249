"""Secure Boot with the user's own keys (`--secure-boot-keys`).

A libvirt VM of the demo image, its disk signed with db key A and its OVMF
trusting only A's certificates, boots with Secure Boot on (boot 1, the
guest says so).  Under the same enrolled keys, plain QEMU starts the kernel
of a disk A signed and refuses one that key B signed (neither boots fully).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bcvk.host import secureboot
from tests.conftest import DEMO_IMAGE, bcvk, image_exists
from tests.integration import libvirt_env as env
from tests.integration.test_to_disk import make_sb_keys

PREFIX = f"bcvk-sb-{uuid.uuid4().hex[:6]}"
SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    env.ensure_daemons()
    if not image_exists(DEMO_IMAGE):
        pytest.skip(f"{DEMO_IMAGE} not built (run `make images`)")
    base = tmp_path_factory.mktemp("sb")
    yield make_sb_keys(base / "a"), make_sb_keys(base / "b")
    env.cleanup(PREFIX)


def test_a_vm_with_the_users_keys_boots_with_secure_boot_on(keys: tuple[Path, Path]) -> None:
    mine, _ = keys
    name = f"{PREFIX}-vm"
    before = env.volumes()
    run = bcvk("libvirt", "-c", env.URI, "run", "--name", name, "--secure-boot-keys", str(mine),
               "--memory", "1536M", "--disable-tpm", "--ssh-wait", "--timeout", "900",
               DEMO_IMAGE, timeout=1800)  # fmt: skip
    assert run.returncode == 0, run.stderr
    try:
        xml = env.virsh("dumpxml", name).stdout
        assert re.search(r"<loader[^>]*secure=.yes.[^>]*>[^<]*secboot", xml), xml
        template = re.search(r"<nvram template=.([^'\"]+)", xml)
        assert template is not None, xml
        assert Path(template.group(1)).is_file()
        guest = bcvk("libvirt", "-c", env.URI, "ssh", name, "--",
                     f"od -An -tu1 {SECURE_BOOT_VAR}; dmesg | grep -i 'secure boot'")  # fmt: skip
        assert guest.returncode == 0, guest.stderr
        values, *messages = guest.stdout.splitlines()
        assert values.split()[-1] == "1"  # the firmware's SecureBoot variable: on
        assert any("enabled" in m.lower() for m in messages), guest.stdout
    finally:
        removed = bcvk("libvirt", "-c", env.URI, "rm", "-f", name)
    assert removed.returncode == 0, removed.stderr
    assert name not in env.domain_names()
    # The signed base disk is this test's own cache entry: other tests never use it.
    for volume in env.volumes() - before:
        if volume.startswith("bootc-base-"):
            env.virsh("vol-delete", "--pool", "default", volume)


@contextlib.contextmanager
def firmware_console(disk: Path, variables: Path, log: Path) -> Iterator[Path]:
    """Plain QEMU with the Secure Boot OVMF and VARIABLES, its serial in LOG."""
    fw = secureboot.secure_firmware()
    argv = ["qemu-system-x86_64", "-machine", "q35,smm=on,accel=tcg", "-m", "1024",
            "-global", "driver=cfi.pflash01,property=secure,value=on",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={fw.code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={variables}",
            "-drive", f"file={disk},if=virtio,format=qcow2,snapshot=on",
            "-serial", f"file:{log}", "-display", "none", "-monitor", "none",
            "-nic", "none"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield log
    finally:
        proc.kill()
        proc.wait(timeout=30)


def wait_for(log: Path, patterns: tuple[str, ...], seconds: float) -> str | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        for pattern in patterns:
            if pattern in text:
                return pattern
        time.sleep(1)
    return None


def test_only_a_disk_signed_with_the_enrolled_db_key_starts(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    mine, other = keys
    template = secureboot.enrolled_template(
        secureboot.load_keys(mine), secureboot.secure_firmware()
    )
    for signer, expect_linux in ((mine, True), (other, False)):
        disk = tmp_path / f"{signer.name}.qcow2"
        bcvk("to-disk", DEMO_IMAGE, str(disk), "--karg", "console=ttyS0",
             "--secure-boot-keys", str(signer), check=True)  # fmt: skip
        variables = tmp_path / f"{signer.name}-VARS.fd"
        variables.write_bytes(template.read_bytes())
        log = tmp_path / f"{signer.name}.log"
        with firmware_console(disk, variables, log):
            seen = wait_for(log, ("Linux version", "Access Denied", "Security Violation"), 300)
        text = log.read_text(errors="replace")
        if expect_linux:
            assert seen == "Linux version", text[-2000:]
        else:
            assert seen in ("Access Denied", "Security Violation"), text[-2000:]
            assert "Linux version" not in text
