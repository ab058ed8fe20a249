"""bootc's filesystem model on every initramfs bcvk boots, and what runs on it.

One boot each, on real VMs (TCG), checking what the guest reports:

- the initramfs-tools variant (no systemd in its initramfs): the layout the
  demo image gets from its dracut initrd, and SSH works;
- the podman variant: a container runs inside the guest, its overlay storage
  on the guest's /var (overlayfs on overlayfs is what upstream's PR #189 fixed);
- --systemd-units: a unit from the host runs at boot and sees the --bind and
  --ro-bind shares (upstream's bind, ro_bind), and an ordering cycle between
  two units shows in the journal (upstream's detect_ordering_cycle);
- the UKI-only variant boots and runs --execute (upstream's uki_only), with
  an instance type's size (upstream's with_instancetype).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    DEMO_IMAGE,
    INITRAMFS_TOOLS_IMAGE,
    PODMAN_IMAGE,
    UKI_IMAGE,
    image_exists,
)
from tests.integration.ephemeral_support import (
    SSH_TIMEOUT,
    Session,
    session_fixture,  # noqa: F401  (fixture)
)

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("no_leaks")]

LAYOUT = (
    "for m in / /etc /var; do findmnt -n -r -o FSTYPE,OPTIONS $m | cut -d, -f1; done; "
    "echo e > /etc/bcvk-w && echo v > /var/bcvk-w && cat /etc/bcvk-w /var/bcvk-w"
)


def reach(port: int) -> str:
    """Guest shell: can it open a TCP connection to the host's loopback (slirp's 10.0.2.2)?"""
    return (
        f"if timeout 10 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}' 2>/dev/null; "
        "then echo host-reachable; else echo host-unreachable; fi"
    )


@pytest.fixture
def host_server() -> Iterator[int]:
    """A TCP listener on the host's 127.0.0.1 that accepts every connection."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def need(image: str) -> str:
    assert image_exists(image), f"{image} is built by `make images`"
    return image


def test_initramfs_tools_image_gets_the_layout(session: Session, host_server: int) -> None:
    """Also --network-isolation: SSH still works, the host's loopback does not answer."""
    image = need(INITRAMFS_TOOLS_IMAGE)
    result = session.bcvk(
        "ephemeral", "run-ssh", "--warm", "off", "--network-isolation",
        "--ssh-timeout", SSH_TIMEOUT, image, "--",
        f"{LAYOUT}; {reach(host_server)}; grep -o 'root=LABEL=[^ ]*' /proc/cmdline",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "host-unreachable" in lines
    # initramfs-tools cannot mount virtiofs: the root is the read-only ext4 copy.
    assert lines[:5] == ["ext4 ro", "overlay rw", "tmpfs rw", "e", "v"]
    assert lines[-1].startswith("root=LABEL=bcvk-")
    assert session.leftovers() == []


def test_podman_runs_a_container_in_the_guest(session: Session) -> None:
    """Also --bind-storage-ro: the host's images are listed by the guest's podman,
    read-only (upstream's run_bind_storage_ro)."""
    image = need(PODMAN_IMAGE)
    result = session.bcvk(
        "ephemeral", "run-ssh", "--warm", "off", "--memory", "2G", "--bind-storage-ro",
        "--ssh-timeout", SSH_TIMEOUT, image, "--",
        "podman info --format '{{.Store.GraphDriverName}} {{.Store.GraphRoot}}'; "
        "podman run --rm --network none localhost/bcvk/tiny:latest "
        "sh -c 'echo hello-from-the-container; grep \" / / \" /proc/self/mountinfo'; "
        "podman images --format '{{.Repository}}:{{.Tag}}' | grep -x '" + DEMO_IMAGE + "'; "
        "touch /run/host-container-storage/x 2>/dev/null || echo store-read-only",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "overlay /var/lib/containers/storage"
    assert lines[1] == "hello-from-the-container"
    # The container's own root is an overlay, mounted on the guest's /var tmpfs.
    assert " - overlay " in lines[2], lines
    assert lines[3:] == [DEMO_IMAGE, "store-read-only"]
    assert session.leftovers() == []


def test_systemd_units_run_from_boot_and_a_cycle_shows(session: Session, tmp_path: Path) -> None:
    units = tmp_path / "units"
    wants = units / "default.target.wants"
    wants.mkdir(parents=True)
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    for d in (rw, ro):
        d.mkdir()
        (d / "file").write_text(f"from the host, {d.name}\n")
    # Upstream's bind/ro_bind: a unit at boot sees both shares, and cannot write the ro one.
    (units / "bcvk-verify.service").write_text(
        "[Unit]\nDescription=verify\n[Service]\nType=oneshot\nRemainAfterExit=yes\n"
        "ExecStart=sh -c 'cat /run/virtiofs-mnt-rw/file /run/virtiofs-mnt-ro/file > /run/v; "
        "echo from-the-guest > /run/virtiofs-mnt-rw/back; "
        "touch /run/virtiofs-mnt-ro/nope 2>/dev/null || echo ro-refused >> /run/v; "
        "echo verified-at-boot >> /run/v'\n"
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
        "--bind", f"{rw}:rw", "--ro-bind", f"{ro}:ro",
        "--execute", "cat /run/v; journalctl -b -o json -g 'ordering cycle' | head -1",
        DEMO_IMAGE,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:4] == ["from the host, rw", "from the host, ro", "ro-refused", "verified-at-boot"]
    assert "ordering cycle" in json.loads(lines[4])["MESSAGE"]
    assert (rw / "back").read_text() == "from-the-guest\n"
    assert not (ro / "nope").exists()
    assert session.leftovers() == []


def test_uki_only_image_boots_with_an_instance_type(session: Session, tmp_path: Path) -> None:
    """Also --cloud-init: the guest sees the seed's user-data."""
    image = need(UKI_IMAGE)
    inspect = session.bcvk("images", "inspect", "--format", "json", image)
    assert inspect.returncode == 0, inspect.stderr
    (kernel,) = json.loads(inspect.stdout)["kernels"]
    assert kernel["kind"] == "uki"
    seed = tmp_path / "user-data"
    seed.write_text("#cloud-config\n# bcvk-seed-marker\n")
    result = session.bcvk(
        "ephemeral", "run", "--itype", "u1.micro", "--cloud-init", str(seed),
        "--execute", "echo UKI_BOOT_SUCCESS; nproc; awk '/MemTotal/ {print $2}' /proc/meminfo; "
        "findmnt -n -o FSTYPE /etc; mount -o ro /dev/disk/by-label/CIDATA /mnt && "
        "grep -o bcvk-seed-marker /mnt/user-data",
        image,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    marker, cpus, mem_kib, etc, seen = result.stdout.split()
    assert (marker, cpus, etc, seen) == ("UKI_BOOT_SUCCESS", "1", "overlay", "bcvk-seed-marker")
    assert 900 * 1024 < int(mem_kib) <= 1024 * 1024  # u1.micro: 1 GiB
    assert session.leftovers() == []
