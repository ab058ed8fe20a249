"""The plumbing of `bcvk to-disk --installer bootc`, with a STAND-IN installer.

No real bootc binary can be installed on these hosts.  The fixture image
localhost/bcvk/fixture-bootc-installer (scripts/build-installer-fixture.sh)
is the demo image plus a stand-in /usr/bin/bootc: it checks the flags bcvk
passes, prints progress, formats the target disk as one ext4 filesystem
holding its arguments and what it saw in the VM, writes a BIOS boot sector
that prints a line on COM1, and fails on request.  What is tested is bcvk's
side: the installer VM boots from the image into bcvk-to-disk.target with swap
and a /var/tmp tmpfs, sees the target as /dev/disk/by-id/virtio-output, gets
the right command line, its output is streamed, its failure reported with its
message, and the result is cached; and a BIOS libvirt VM boots such a disk.
Each test boots one installer VM (TCG: a minute or two).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from bcvk.to_disk import output
from tests.conftest import DEMO_IMAGE, ROOT, bcvk, image_exists
from tests.integration import libvirt_env as env

FIXTURE = "localhost/bcvk/fixture-bootc-installer:latest"
VM_TIMEOUT = 1200
BIOS_LINE = "BCVK-STANDIN-BIOS-BOOT"  # what the stand-in's boot sector prints on COM1


@pytest.fixture(scope="module")
def installer_image() -> str:
    if os.geteuid() != 0:
        pytest.skip("building the stand-in fixture needs root")
    if not image_exists(DEMO_IMAGE):
        pytest.skip(f"{DEMO_IMAGE} not built (run `make images`)")
    subprocess.run([ROOT / "scripts" / "build-installer-fixture.sh"], check=True)
    return FIXTURE


def debugfs_cat(image: Path, path: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True, check=True
    ).stdout


def test_auto_runs_the_images_own_installer_in_a_vm(installer_image: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys.pub"
    keys.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBcvkStandIn test\n")
    # A ':' in OUTPUT once broke the installer, which passed paths on as flag text.
    out = tmp_path / "disk:v1.raw"
    argv = ["to-disk", installer_image, str(out), "--filesystem", "xfs", "--karg", "console=ttyS0",
            "--root-size", "2G", "--root-ssh-authorized-keys", str(keys),
            # upstream's pass-through flags, and the installer VM's size
            "--target-transport", "containers-storage", "--composefs-backend",
            "--bootloader", "systemd", "--allow-missing-fsverity",
            "--memory", "3G", "--vcpus", "2"]  # fmt: skip
    # podman-bootc's variable reaches `bootc install` as RUST_LOG
    result = bcvk(*argv, env={"BOOTC_INSTALL_LOG": "bootc_lib=debug"}, timeout=VM_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "bootc stand-in: RUST_LOG=bootc_lib=debug" in result.stderr
    # --installer auto chose bootc because the image has /usr/bin/bootc
    assert "The image contains bootc: installing with its own" in result.stderr
    # the installer's output is streamed to stderr
    assert "bootc stand-in (bcvk test fixture): install to-disk" in result.stderr
    assert "Installation complete!" in result.stderr
    assert result.stdout == ""

    label = subprocess.run(["blkid", "-p", "-o", "value", "-s", "LABEL", str(out)],
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert label == "bootc-standin"
    args = debugfs_cat(out, "/install-args.txt").strip()
    assert args == (
        "install to-disk --generic-image --skip-fetch-check "
        f"--source-imgref containers-storage:{installer_image} --filesystem xfs "
        "--root-size 2048M --karg=console=ttyS0 "
        "--target-transport containers-storage --composefs-backend --bootloader systemd "
        "--allow-missing-fsverity "
        "--root-ssh-authorized-keys /run/bcvk-authorized-keys /dev/disk/by-id/virtio-output"
    )
    assert "Debian GNU/Linux 12" in debugfs_cat(out, "/os-release")
    # What the stand-in saw in the running installer VM, as upstream sets it up:
    # swap and a /var/tmp tmpfs the size of the disk, and bcvk-to-disk.target
    # instead of the image's multi-user.target and its services.
    evidence = debugfs_cat(out, "/guest-evidence.txt").splitlines()
    swaps = [line.split() for line in evidence if line.startswith("/dev/")]  # /proc/swaps
    assert len(swaps) == 1, evidence
    swap_kib = int(swaps[0][2])
    assert 4 * 1024**2 - 64 <= swap_kib <= 4 * 1024**2, evidence  # minus mkswap's header
    assert f"var-tmp: {4 * 1024**3} tmpfs" in evidence
    assert "multi-user.target: inactive" in evidence
    assert "fixture-user: not run" in evidence
    assert out.stat().st_size == 4 * 1024**3
    assert os.getxattr(out, output.XATTR_HASH).startswith(b"sha256:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk:v1.raw", "keys.pub"]
    dry = bcvk(*argv, "--dry-run")
    assert dry.stdout == "would-reuse\n"
    # upstream's caching test: the same digest under another tag is another disk
    other = installer_image.replace(":latest", ":other-tag")
    subprocess.run(["podman", "tag", installer_image, other], check=True)
    try:
        retagged = bcvk("to-disk", other, *argv[2:], "--dry-run")
        assert retagged.stdout == "would-regenerate\n", retagged.stderr
    finally:
        subprocess.run(["podman", "untag", installer_image, other], check=True)


def test_installer_failure_reports_its_message(installer_image: str, tmp_path: Path) -> None:
    out = tmp_path / "disk.qcow2"
    result = bcvk("to-disk", installer_image, str(out), "--installer", "bootc",
                  "--karg", "bcvk.standin.fail", timeout=VM_TIMEOUT)  # fmt: skip
    assert result.returncode == 1
    assert (
        "error: bootc install to-disk failed in the installer VM (exit status 1): "
        "error: Installing to disk: stand-in failure requested by bcvk.standin.fail"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_libvirt_bios_vm_boots_the_bootc_installers_disk(
    installer_image: str, tmp_path: Path
) -> None:
    """--firmware bios is allowed because auto picks the image's bootc installer.

    The stand-in's disk holds no OS, so SSH cannot answer: the guest here is
    the boot sector the stand-in wrote, and COM1 (the domain's serial console,
    logged to --console-log) is the only thing it can report on.
    """
    env.ensure_daemons()
    name = f"bcvk-it-{uuid.uuid4().hex[:6]}-bios"
    console = tmp_path / "console.log"
    base: str | None = None
    try:
        run = bcvk("libvirt", "-c", env.URI, "run", "--name", name, "--firmware", "bios",
                   "--memory", "1G", "--console-log", str(console), installer_image,
                   timeout=VM_TIMEOUT)  # fmt: skip
        assert run.returncode == 0, run.stderr
        info = json.loads(
            bcvk("libvirt", "-c", env.URI, "inspect", name, "--format", "json").stdout
        )
        base = str(info["metadata"]["base_disk"])
        deadline = time.monotonic() + 300
        while BIOS_LINE not in (console.read_text(errors="replace") if console.exists() else ""):
            assert time.monotonic() < deadline, f"no {BIOS_LINE} on the console in 300s"
            assert env.domstate(name) == "running"
            time.sleep(1)
        xml = env.virsh("dumpxml", name).stdout
        assert "<loader" not in xml
        assert "OVMF" not in xml
        assert "firmware='efi'" not in xml.replace('"', "'")
        key = Path(str(info["ssh_private_key_path"]))
        disk = Path(str(info["disk_path"]))
        assert key.is_file()
        removed = bcvk("libvirt", "-c", env.URI, "rm", "-f", name)
        assert removed.returncode == 0, removed.stderr
        assert name not in env.domain_names()
        assert disk.name not in env.volumes()
        assert not disk.exists()
        assert not key.parent.exists()
    finally:
        env.cleanup(name)
        if base is not None:
            # Built from the fixture image for this test alone: no other VM uses it.
            env.virsh("vol-delete", "--pool", "default", base, check=False)
    assert base is not None
    assert base not in env.volumes()
