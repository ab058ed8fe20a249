"""The ephemeral VM registry: records, liveness by pid + start time, reaping."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from bcvk.ephemeral import registry as state
from bcvk.ephemeral.registry import Proc, VmRecord
from bcvk.errors import BcvkError, UsageError
from bcvk.host import proc
from bcvk.values import validate_vm_name


@pytest.fixture(autouse=True)
def runtime(isolated_home: Path) -> Path:
    return isolated_home / "runtime" / "bcvk" / "ephemeral"


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def me() -> Proc:
    return Proc.of("bcvk", os.getpid(), group=False)


@pytest.mark.parametrize("name", ["a", "vm-1", "My_VM.2", "x" * 63])
def test_good_names(name: str) -> None:
    assert validate_vm_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", ".a", "a b", "a/b", "x" * 64, "ä", "a\nb", "ok\n"])
def test_bad_names(name: str) -> None:
    with pytest.raises(UsageError):
        validate_vm_name(name)


def test_start_time_identifies_processes() -> None:
    mine = me()
    assert mine.alive()
    assert not Proc("x", os.getpid(), mine.started + 1, group=False).alive()
    assert proc.start_time(dead_pid()) is None


def test_record_round_trips_through_json() -> None:
    record = VmRecord(
        name="vm",
        image="img",
        ssh_port=2222,
        forwards=[(8080, 80)],
        qemu=Proc("qemu", 10, 20),
        helpers=[Proc("virtiofsd", 11, 21)],
        mount="abc",
        mount_state="mounted",
    )
    again = VmRecord.from_json(record.to_json())
    assert again == record
    # Unknown keys from a newer bcvk are ignored.
    assert VmRecord.from_json({**record.to_json(), "future": 1}) == record


def test_create_reserves_a_name_once() -> None:
    d, record = state.create("vm1", lambda used: VmRecord(name="vm1", image="i", supervisor=me()))
    assert d.path.is_dir()
    assert oct(d.path.stat().st_mode & 0o777) == "0o700"
    assert d.read() == record
    with pytest.raises(BcvkError, match="already exists"):
        state.create("vm1", lambda used: VmRecord(name="vm1", image="i"))


def test_make_record_sees_ports_of_other_vms() -> None:
    state.create(
        "a",
        lambda used: VmRecord(
            name="a", image="i", ssh_port=4000, forwards=[(5000, 80)], supervisor=me()
        ),
    )
    seen: list[set[int]] = []

    def make(used: set[int]) -> VmRecord:
        seen.append(used)
        return VmRecord(name="b", image="i", supervisor=me())

    state.create("b", make)
    assert seen == [{4000, 5000}]


def test_a_failing_record_leaves_no_directory(runtime: Path) -> None:
    def boom(used: set[int]) -> VmRecord:
        raise BcvkError("no port")

    with pytest.raises(BcvkError):
        state.create("vm", boom)
    assert not (runtime / "vm").exists()


def test_scan_prunes_vms_whose_processes_are_gone(
    runtime: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    leftover = tmp_path / "swap-file"
    leftover.write_text("x")
    unmounted: list[str | None] = []
    monkeypatch.setattr("bcvk.host.podman.unmount_image", unmounted.append)
    dead = Proc("qemu", dead_pid(), 12345)
    state.create(
        "gone",
        lambda used: VmRecord(
            name="gone",
            image="i",
            qemu=dead,
            mount="img-id",
            mount_state="mounted",
            files=[str(leftover)],
        ),
    )
    state.create("live", lambda used: VmRecord(name="live", image="i", qemu=me()))
    (runtime / "half-made").mkdir()  # a bcvk died between mkdir and the record
    names = [record.name for _, record in state.scan()]
    assert names == ["live"]
    assert not (runtime / "gone").exists()
    assert not (runtime / "half-made").exists()
    assert unmounted == ["img-id"]
    assert not leftover.exists()


def test_foreground_vm_is_starting_while_its_bcvk_lives() -> None:
    record = VmRecord(name="x", image="i", supervisor=me())
    assert record.status() == "starting"
    record.supervisor = Proc("bcvk", dead_pid(), 1, group=False)
    assert record.status() == "stale"
    record.qemu = me()
    assert record.status() == "running"


def test_terminate_kills_the_whole_process_group() -> None:
    # A group leader that started a child (like `podman unshare virtiofsd`).
    leader = subprocess.Popen(["sh", "-c", "sleep 300 & wait"], start_new_session=True)
    proc = Proc.of("helper", leader.pid)
    for _ in range(100):
        if len(proc.members()) == 2:
            break
        import time

        time.sleep(0.02)
    assert len(proc.members()) == 2
    state.terminate([proc], timeout=2)
    leader.wait(timeout=5)
    assert proc.members() == []


def test_lookup_validates_the_name() -> None:
    with pytest.raises(UsageError):
        state.lookup("../etc")
    assert state.lookup("nobody") is None


def test_a_vm_is_reaped_once_even_by_two_reapers(
    runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unmounted: list[str | None] = []
    monkeypatch.setattr("bcvk.host.podman.unmount_image", unmounted.append)
    d, record = state.create(
        "twice",
        lambda used: VmRecord(name="twice", image="i", mount="id", mount_state="mounted"),
    )
    state.reap(d, record)
    state.reap(d, record)  # e.g. `rm` and the foreground bcvk both cleaning up
    assert unmounted == ["id"]
    assert list(runtime.iterdir()) == [runtime / ".lock"]


def test_an_abandoned_reaping_claim_is_finished(
    runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unmounted: list[str | None] = []
    monkeypatch.setattr("bcvk.host.podman.unmount_image", unmounted.append)
    d, _ = state.create(
        "half", lambda used: VmRecord(name="half", image="i", mount="id", mount_state="mounted")
    )
    # A reaper that died right after claiming the directory.
    d.path.rename(runtime / f".half.reaping-{dead_pid()}")
    assert state.scan() == []
    assert unmounted == ["id"]
    assert list(runtime.iterdir()) == [runtime / ".lock"]


def test_records_written_from_two_threads_at_once_all_land(runtime: Path) -> None:
    # The launcher records spawned pids on the main thread while a worker
    # thread records the image mount: neither write may lose the other's file.
    d, record = state.create("vm1", lambda used: VmRecord(name="vm1", image="i", supervisor=me()))
    errors: list[BaseException] = []

    def hammer(label: str) -> None:
        try:
            for i in range(200):
                record.mount = f"{label}{i}"
                d.write(record)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(x,)) for x in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert d.read() is not None
    assert sorted(p.name for p in d.path.glob("*.tmp")) == []


def test_a_restore_whose_bcvk_died_before_the_hand_over_is_stale() -> None:
    """Its QEMU may run on, paused or without a key: reaped, never listed as running."""
    record = VmRecord(name="x", image="i", supervisor=me(), qemu=me(), start="warm")
    assert record.status() == "running"
    record.supervisor = Proc("bcvk", dead_pid(), 1, group=False)
    assert record.status() == "stale"
    record.supervisor = None  # handed over: a detached warm VM like any other
    assert record.status() == "running"
