"""bootc's filesystem model on every initramfs bcvk boots, and what runs on it.

One boot each, on real VMs (TCG), checking what the guest reports:

- the initramfs-tools variant (no systemd in its initramfs): the layout the
  demo image gets from its dracut initrd, and SSH works;
- the podman variant: a container runs inside the guest, its overlay storage
  on the guest's /var (overlayfs on overlayfs is what upstream's PR #189 fixed);
- --systemd-units: a unit from the host runs at boot, and an ordering cycle
  between two units shows in the journal (upstream's detect_ordering_cycle).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import DEMO_IMAGE, INITRAMFS_TOOLS_IMAGE, PODMAN_IMAGE, image_exists
from tests.integration.ephemeral_support import (
    SSH_TIMEOUT,
    Session,
    session_fixture,  # noqa: F401  (fixture)
)

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("no_leaks")]

LAYOUT = (
    "for m in / /etc /var; do findmnt -n -o FSTYPE,OPTIONS $m | cut -d, -f1; done; "
    "echo e > /etc/bcvk-w && echo v > /var/bcvk-w && cat /etc/bcvk-w /var/bcvk-w"
)


def need(image: str) -> str:
    assert image_exists(image), f"{image} is built by `make images`"
    return image


def test_initramfs_tools_image_gets_the_layout(session: Session) -> None:
    image = need(INITRAMFS_TOOLS_IMAGE)
    result = session.bcvk(
        "ephemeral", "run-ssh", "--warm", "off", "--ssh-timeout", SSH_TIMEOUT, image, "--",
        f"{LAYOUT}; grep -o 'root=LABEL=[^ ]*' /proc/cmdline",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # initramfs-tools cannot mount virtiofs: the root is the read-only ext4 copy.
    assert lines[:5] == ["ext4 ro", "overlay rw", "tmpfs rw", "e", "v"]
    assert lines[-1].startswith("root=LABEL=bcvk-")
    assert session.leftovers() == []


def test_podman_runs_a_container_in_the_guest(session: Session) -> None:
    image = need(PODMAN_IMAGE)
    result = session.bcvk(
        "ephemeral", "run-ssh", "--warm", "off", "--memory", "2G", "--ssh-timeout", SSH_TIMEOUT,
        image, "--",
        "podman info --format '{{.Store.GraphDriverName}} {{.Store.GraphRoot}}'; "
        "podman run --rm --network none localhost/bcvk/tiny:latest "
        "sh -c 'echo hello-from-the-container; cat /proc/self/mountinfo' | "
        "sed -n '1p;/ \\/ /p'",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "overlay /var/lib/containers/storage"
    assert lines[1] == "hello-from-the-container"
    # The container's own root is an overlay, mounted on the guest's /var tmpfs.
    assert " - overlay " in lines[2], lines
    assert session.leftovers() == []


def test_systemd_units_run_from_boot_and_a_cycle_shows(session: Session, tmp_path: Path) -> None:
    units = tmp_path / "units"
    wants = units / "default.target.wants"
    wants.mkdir(parents=True)
    (units / "bcvk-verify.service").write_text(
        "[Unit]\nDescription=verify\n[Service]\nType=oneshot\nRemainAfterExit=yes\n"
        "ExecStart=sh -c 'echo verified-at-boot > /run/bcvk-verify'\n"
    )
    # Each wants and orders itself before the other: systemd breaks the cycle and logs it.
    for me, other in (("cycle-a", "cycle-b"), ("cycle-b", "cycle-a")):
        (units / f"{me}.service").write_text(
            f"[Unit]\nWants={other}.service\nBefore={other}.service\n"
            "[Service]\nType=oneshot\nExecStart=true\n"
        )
    for name in ("bcvk-verify", "cycle-a", "cycle-b"):
        (wants / f"{name}.service").symlink_to(f"../{name}.service")
    result = session.bcvk(
        "ephemeral", "run", "--systemd-units", str(units), "--karg", "systemd.mask=ssh.service",
        "--execute", "cat /run/bcvk-verify; journalctl -b -o json -g 'ordering cycle' | head -1",
        DEMO_IMAGE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()[:2]
    assert first == "verified-at-boot"
    assert "ordering cycle" in json.loads(second)["MESSAGE"]
    assert session.leftovers() == []
