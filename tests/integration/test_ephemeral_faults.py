"""Bad input and faults: one clear error, a non-zero exit, nothing left behind.

None of these waits for a guest to finish booting: refusals happen before
QEMU starts, and the process-kill tests act while the guest is still early
in its boot.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DEMO_IMAGE, FIXTURES, image_exists
from tests.integration.ephemeral_support import (
    Session,
    marked_processes,
    session_fixture,  # noqa: F401  (fixture)
    unique,
)
from tests.integration.guest_logs import halt_in_the_kernel

pytestmark = pytest.mark.usefixtures("no_leaks")


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    missing = [ref for ref in (DEMO_IMAGE, *FIXTURES.values()) if not image_exists(ref)]
    if missing:
        pytest.skip(f"images missing: {missing} (run `make images`)")
    return {"demo": DEMO_IMAGE, **FIXTURES}


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return errors[0]


@pytest.mark.parametrize(
    ("fixture", "message", "hint"),
    [
        ("not-bootc", "no kernel found", "not a bootc image"),
        ("no-kernel", "no kernel found", "not a bootc image"),
        ("two-kernels", "found 2 kernels", "all but one"),
    ],
)
def test_unbootable_images_are_refused(
    images: dict[str, str], session: Session, fixture: str, message: str, hint: str
) -> None:
    result = session.bcvk("ephemeral", "run-ssh", images[fixture], "--", "true")
    assert result.returncode == 1
    assert message in one_error(result)
    assert hint in result.stderr
    assert session.leftovers() == []


def test_missing_image_is_not_pulled_with_pull_never(session: Session) -> None:
    result = session.bcvk("ephemeral", "run", "--pull", "never", "localhost/bcvk/no-such:1")
    assert result.returncode == 1
    assert "not in local storage" in one_error(result)
    assert session.leftovers() == []


def test_port_already_taken(images: dict[str, str], session: Session) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = session.bcvk("ephemeral", "run", "-d", "-p", f"{port}:80", images["demo"])
    assert result.returncode == 1
    assert f"host port {port} is not available" in one_error(result)
    assert session.leftovers() == []


def test_requested_virtiofsd_missing(images: dict[str, str], session: Session) -> None:
    result = session.bcvk(
        "ephemeral", "run", "--rootfs", "virtiofs", "--virtiofsd", "/nonexistent/virtiofsd",
        images["demo"],
    )  # fmt: skip
    assert result.returncode == 1
    assert "virtiofsd" in one_error(result)
    assert "hint:" in result.stderr
    assert session.leftovers() == []


def test_bad_values(images: dict[str, str], session: Session, tmp_path: Path) -> None:
    for args in (
        ["--memory", "12Q"],
        ["--vcpus", "0"],
        ["--itype", "u9.mega"],
        ["--port", "22"],
        ["--bind", str(tmp_path / "missing")],
        ["--name", "bad name"],
    ):
        result = session.bcvk("ephemeral", "run", *args, images["demo"])
        assert result.returncode == 2, args
        one_error(result)
    assert session.leftovers() == []


def test_qemu_dying_at_start_is_quoted(images: dict[str, str], session: Session) -> None:
    # 1000 GiB passes our validation but not QEMU's address-space check.
    result = session.bcvk("ephemeral", "run-ssh", "--memory", "1000G", images["demo"], "--", "true")
    assert result.returncode == 1
    error = one_error(result)
    assert "QEMU exited during boot" in error
    # QEMU's words depend on the memory backend (virtiofs: memfd; block: RAM)
    assert "phys-bits" in error or "cannot set up guest memory" in error
    assert "hint: QEMU cannot give the guest 1024000 MiB here: ask for less --memory" in (
        result.stderr
    )
    assert session.leftovers() == []


def test_unlabelled_image_warns_and_proceeds(images: dict[str, str], session: Session) -> None:
    name = unique("unlabelled")
    result = session.bcvk("ephemeral", "run", "-d", "--name", name, images["unlabelled"])
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr
    assert "containers.bootc=1" in result.stderr
    assert session.bcvk("ephemeral", "rm", "-f", name).returncode == 0
    assert session.leftovers() == []


def test_sigkill_of_bcvk_during_boot_leaves_no_orphans(
    images: dict[str, str], session: Session
) -> None:
    name = unique("killed")
    proc = session.popen(
        "ephemeral", "run-ssh", "--rootfs", "virtiofs", "--name", name, images["demo"], "--", "true"
    )
    try:
        session.wait_for_processes(name, {"qemu", "virtiofsd"})
        # Killed while the guest boots: QEMU runs, SSH has not answered yet.
        session.wait_for_phase(name, "running")
    finally:
        proc.kill()
        proc.communicate()
    # The parent-death signal takes QEMU and virtiofsd down with bcvk.
    deadline = time.monotonic() + 20
    while marked_processes(session.token) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marked_processes(session.token) == []
    # The image mount and state dir it could not undo are reaped by the next command.
    assert session.state_dirs() == [name]
    listed = session.bcvk("ephemeral", "ps", "--format", "json")
    assert (listed.returncode, json.loads(listed.stdout)) == (0, [])
    assert session.leftovers() == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_during_boot_tear_down(
    images: dict[str, str], session: Session, sig: signal.Signals
) -> None:
    name = unique("signalled")
    # A cold boot (a warm start would be over before the signal).
    proc = session.popen(
        "ephemeral", "run-ssh", "--warm", "off", "--name", name, images["demo"], "--", "true"
    )
    try:
        session.wait_for_processes(name, {"qemu"})
        session.wait_for_phase(name, "running")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert session.leftovers(wait=5) == []


def test_sigkill_of_detached_qemu(images: dict[str, str], session: Session) -> None:
    names = [unique("det-a"), unique("det-b")]
    for name in names:
        result = session.bcvk(
            "ephemeral", "run", "-d", "--rootfs", "virtiofs", "--name", name, images["demo"]
        )
        assert result.returncode == 0, result.stderr
    for name in names:
        record = session.vm_record(name)
        assert record is not None
        os.kill(record["qemu"]["pid"], signal.SIGKILL)
    # `rm` of a VM whose QEMU died still succeeds (and reaps virtiofsd, mount, dir).
    removed = session.bcvk("ephemeral", "rm", names[0])
    assert removed.returncode == 0, removed.stderr
    # `ps` drops the other one without an error.
    listed = session.bcvk("ephemeral", "ps", "--format", "json")
    assert (listed.returncode, json.loads(listed.stdout)) == (0, [])
    assert "error" not in listed.stderr
    assert session.leftovers() == []


@pytest.fixture
def image_without_sshd(images: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """The demo image minus sshd, made the way build-images.sh derives fixtures."""
    ref = f"localhost/bcvk/test-no-sshd:{os.getpid()}"
    mnt = subprocess.run(
        ["podman", "image", "mount", images["demo"]], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        tarball = tmp_path / "rootfs.tar"
        with tarfile.open(tarball, "w") as tar:
            tar.add(mnt, arcname=".", filter=lambda t: None if t.name == "./usr/sbin/sshd" else t)
    finally:
        subprocess.run(["podman", "image", "unmount", images["demo"]], capture_output=True)
    subprocess.run(
        ["podman", "import", "-q", "--change", "LABEL containers.bootc=1", str(tarball), ref],
        capture_output=True,
        check=True,
    )
    yield ref
    subprocess.run(["podman", "rmi", "-f", ref], capture_output=True)


def test_guest_without_sshd_times_out_naming_it(image_without_sshd: str, session: Session) -> None:
    result = session.bcvk(
        "ephemeral", "run-ssh", "--ssh-timeout", "20", image_without_sshd, "--", "true"
    )
    assert result.returncode == 1
    assert "sshd is not installed" in result.stderr  # the warning before booting
    assert "did not answer SSH" in one_error(result)
    assert "console:" in result.stderr  # the console tail is quoted
    assert "no sshd" in result.stderr  # the hint names the cause
    assert session.leftovers() == []


def qmp_execute(sock_path: Path, command: str) -> None:
    """One QMP command, by hand (QEMU's monitor protocol: a greeting, then JSON lines)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(sock_path))
        reader = sock.makefile("r")
        reader.readline()  # the greeting
        for request in ("qmp_capabilities", command):
            sock.sendall(json.dumps({"execute": request}).encode() + b"\n")
            while "return" not in (reply := json.loads(reader.readline())):
                assert "error" not in reply, reply


def test_a_kernel_that_stops_is_booted_again(images: dict[str, str], session: Session) -> None:
    """A guest halted in its kernel's boot, as QEMU's TCG hang leaves one, is booted
    again once its console has been silent for $BCVK_BOOT_STALL_TIMEOUT."""
    name = unique("stalled")
    proc = session.popen(
        "ephemeral", "run-ssh", "--warm", "off", "--name", name, images["demo"], "--",
        "echo guest-answered; cat /proc/sys/kernel/random/boot_id",
        env={"BCVK_BOOT_STALL_TIMEOUT": "20"},
    )  # fmt: skip
    try:
        record = session.wait_for_phase(name, "running")
        # The vCPUs stop; QEMU itself keeps serving its monitor, as in the real hang.
        halt_in_the_kernel(
            Path(record["console_log"]),
            lambda: qmp_execute(session.ephemeral_dir / name / "qmp.sock", "stop"),
            proc,
            timeout=120,
        )
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.splitlines()[0] == "guest-answered", out
    retried = [line for line in err.splitlines() if "booting it again" in line]
    assert len(retried) == 1, err
    assert retried[0].startswith("warning: the guest's kernel printed nothing for 20s"), err
    assert "its last line: [" in retried[0]
    assert "Traceback" not in err
    assert session.leftovers() == []
