"""Warm start on real guests: a snapshot saved once, restored fresh into every later VM.

The module has its own cache directory, so its first VM finds no snapshot
and boots cold (boot 1); every later VM of that configuration is restored.
A snapshot corrupted on purpose is dropped and the VM boots cold again,
saving a new one (boot 2).  The other starts are restores or detached cold
starts that are removed at once.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bcvk.ephemeral.options import free_port
from bcvk.host import ssh
from tests import schemas
from tests.conftest import DEMO_IMAGE, image_exists
from tests.integration.ephemeral_support import SSH_TIMEOUT, Session, mount_counts, unique

pytestmark = [pytest.mark.vm]

MEMORY = "1536M"
NO_SNAPSHOT = "cold boot: no snapshot yet (a detached VM does not save one)"


@pytest.fixture(scope="module")
def warm_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    if not image_exists(DEMO_IMAGE):
        pytest.skip(f"{DEMO_IMAGE} not built (run `make images`)")
    work = tmp_path_factory.mktemp("warm")
    run = work / "run"
    run.mkdir(mode=0o700)
    session = Session(token=secrets.token_hex(6), runtime=run, mounts_before=mount_counts())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(work / "cache"))
        mp.delenv("BCVK_WARM", raising=False)
        yield session
    session.bcvk("ephemeral", "rm-all", "-f")
    assert session.leftovers() == []


def run_ssh(session: Session, *args: str, command: str) -> tuple[int, str, str]:
    result = session.bcvk(
        "ephemeral", "run-ssh", "--memory", MEMORY, "--ssh-timeout", SSH_TIMEOUT,
        *args, DEMO_IMAGE, "--", command,
    )  # fmt: skip
    return result.returncode, result.stdout, result.stderr


def snapshots(session: Session) -> list[dict[str, object]]:
    listed = session.bcvk("cache", "list", "--format", "json", check=True)
    found: list[dict[str, object]] = []
    for entry in schemas.check("cache-list", json.loads(listed.stdout)):
        found += entry["snapshots"]
    return found


def snapshot_files() -> list[Path]:
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "bcvk" / "images"
    return sorted(cache.glob("*/warm/*.state"))


def guest_report(session: Session, *args: str) -> tuple[dict[str, str], str, float, float]:
    """Boot (warm), and the guest's view of itself; with the host's clock around it."""
    before = time.time()
    code, out, err = run_ssh(
        session,
        *args,
        command="echo host=$(hostname); echo keys=$(grep -c . /root/.ssh/authorized_keys); "
        "echo key=$(cut -d' ' -f2 /root/.ssh/authorized_keys); echo clock=$(date +%s.%N); "
        "echo fork=$(dmesg | grep -c 'crng reseeded due to virtual machine fork'); "
        "echo marker=$(cat /etc/bcvk-marker /var/bcvk-marker 2>/dev/null | tr -d '\\n'); "
        "echo ran-$$ > /etc/bcvk-marker; echo ran-$$ > /var/bcvk-marker; "
        "echo state=$(systemctl is-system-running)",
    )
    after = time.time()
    assert code == 0, err
    report = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return report, err, before, after


# ---------------------------------------------------------------- boot 1


def test_the_first_vm_boots_cold_and_saves_a_snapshot(warm_session: Session) -> None:
    code, out, err = run_ssh(
        warm_session, command="findmnt -no FSTYPE /; findmnt -no FSTYPE /etc; hostname"
    )
    assert code == 0, err
    assert "cold boot: no snapshot yet; saving a snapshot once SSH answers" in err
    assert "saved warm-start snapshot" in err
    # the read-only block root, with bcvk's writable /etc over it
    assert out.split()[:2] == ["ext4", "overlay"]
    [snap] = snapshots(warm_session)
    assert int(str(snap["size"])) > 50 << 20  # a whole booted machine's memory
    [path] = snapshot_files()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


# ---------------------------------------------------------------- restores


def test_a_warm_vm_is_fresh_its_own_and_on_time(warm_session: Session) -> None:
    report, err, before, after = guest_report(warm_session)
    assert "warm start: restoring snapshot" in err
    assert "cold boot" not in err
    assert report["host"].startswith("bcvk-")  # its own name, not the saved VM's
    assert report["keys"] == "1"  # only its own key; the snapshot holds none
    assert report["fork"] == "1"  # vmgenid: the kernel reseeded its RNG
    assert before - 2 <= float(report["clock"]) <= after + 2
    assert report["marker"] == ""
    assert report["state"] in ("running", "degraded")
    second, err2, _, _ = guest_report(warm_session)
    assert "warm start: restoring snapshot" in err2
    # Nothing the first warm VM wrote (in /etc or /var) reached the second.
    assert second["marker"] == ""
    assert second["host"] != report["host"]
    assert second["key"] != report["key"]


def test_an_earlier_vms_key_does_not_open_a_warm_vm(warm_session: Session) -> None:
    """An earlier warm VM's key is refused by a later one (each holds only its own)."""
    name = unique("warmkey")
    started = warm_session.bcvk("ephemeral", "run", "-d", "--memory", MEMORY, "--name", name,
                                DEMO_IMAGE)  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert "warm start: restoring snapshot" in started.stderr
    kept = warm_session.runtime / "kept-key"
    shutil.copy(warm_session.ephemeral_dir / name / "id_ed25519", kept)
    kept.chmod(0o600)
    record = warm_session.vm_record(name)
    assert record is not None
    assert record["start"] == "warm"
    assert warm_session.bcvk("ephemeral", "rm", "-f", name).returncode == 0
    other = unique("warmkey")
    assert (
        warm_session.bcvk(
            "ephemeral", "run", "-d", "--memory", MEMORY, "--name", other, DEMO_IMAGE
        ).returncode
        == 0
    )
    try:
        port = int(str((warm_session.vm_record(other) or {})["ssh_port"]))
        own = warm_session.bcvk("ephemeral", "ssh", other, "--", "true")
        assert own.returncode == 0, own.stderr
        target = ssh.Target(port=port, key=kept)
        refused = subprocess.run(ssh.argv(target, ["true"], tty=False), capture_output=True,
                                 text=True, timeout=120, check=False)  # fmt: skip
        assert refused.returncode == 255
        assert "Permission denied" in refused.stderr
    finally:
        warm_session.bcvk("ephemeral", "rm", "-f", other)


def test_two_warm_vms_at_once_with_port_forwards(warm_session: Session) -> None:
    ports = [free_port(set()), 0]
    ports[1] = free_port({ports[0]})
    procs = [
        warm_session.popen(
            "ephemeral", "run", "-d", "--memory", MEMORY, "-p", f"{port}:22", DEMO_IMAGE
        )
        for port in ports
    ]
    names = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert "warm start: restoring snapshot" in err
        names.append(out.strip())
    try:
        hosts = set()
        for name in names:
            result = warm_session.bcvk("ephemeral", "ssh", name, "--", "hostname")
            assert result.returncode == 0, result.stderr
            hosts.add(result.stdout.strip())
        assert hosts == set(names)
        # The forward (-p HOST:22) reaches each VM's sshd.
        for port in ports:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                conn.settimeout(30)
                assert conn.recv(64).startswith(b"SSH-2.0-")
    finally:
        removed = warm_session.bcvk("ephemeral", "rm-all", "-f")
    assert sorted(removed.stdout.split()) == sorted(names)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("--memory", "1600M"), "cold boot: no snapshot yet (a detached VM does not save one)"),
        (
            ("--karg", "bcvk.other=1"),
            "cold boot: no snapshot yet (a detached VM does not save one)",
        ),
        (("--warm", "off"), None),
    ],
)
def test_a_changed_machine_or_warm_off_boots_cold(
    warm_session: Session, args: tuple[str, ...], reason: str | None
) -> None:
    before = snapshot_files()
    name = unique("cold")
    started = warm_session.bcvk(
        "ephemeral", "run", "-d", "--memory", MEMORY, *args, "--name", name, DEMO_IMAGE
    )
    try:
        assert started.returncode == 0, started.stderr
        if reason is not None:
            assert reason in started.stderr
        else:  # asked for: nothing to explain
            assert "cold boot" not in started.stderr
        assert "warm start" not in started.stderr
        assert (warm_session.vm_record(name) or {}).get("start") == "cold"
    finally:
        # -f: a guest early in its boot would ignore the power button
        warm_session.bcvk("ephemeral", "rm", "-f", name)
    assert snapshot_files() == before


# ---------------------------------------------------------------- boot 2


def test_a_corrupted_snapshot_is_dropped_and_replaced(warm_session: Session) -> None:
    [path] = snapshot_files()
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.write(b"\0" * 4096)  # same size: only loading it can tell
    code, out, err = run_ssh(warm_session, command="echo alive")
    assert code == 0, err
    assert out.strip() == "alive"
    assert "warm start failed" in err
    assert "removing the snapshot and booting cold" in err
    assert "saved warm-start snapshot" in err
    [new] = snapshot_files()
    with new.open("rb") as f:
        assert f.read(4) == b"QEVM"  # QEMU's migration stream, whole again
    assert abs(new.stat().st_size - size) < size  # a machine of the same kind
    report, err, _, _ = guest_report(warm_session)
    assert "warm start: restoring snapshot" in err
    assert report["keys"] == "1"


def test_cache_prune_removes_the_snapshots(warm_session: Session) -> None:
    assert snapshots(warm_session)
    listed = warm_session.bcvk("cache", "list", check=True).stdout
    assert "SNAPSHOTS" in listed
    pruned = warm_session.bcvk("cache", "prune", "--all")
    assert pruned.returncode == 0, pruned.stderr
    assert snapshot_files() == []
    assert snapshots(warm_session) == []
