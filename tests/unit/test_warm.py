"""Warm start, hermetically: the snapshot key, the plan, the guest's text, the cache."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from bcvk.ephemeral import cache, warm
from bcvk.ephemeral.options import WarmMode, make_options
from bcvk.errors import UsageError
from bcvk.guest import warm as guest
from bcvk.host import qemu
from bcvk.host.qemu import Drive, QemuSpec
from bcvk.values import Accel, PortForward

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTestsOnly0123456789abcdef bcvk-vm1"
IMAGE = "localhost/bcvk/debian-bootc:12"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    found = {}
    for name in ("qemu-system-x86_64", "vmlinuz", "initramfs.img", "rootfs.ext4"):
        path = tmp_path / name
        path.write_text(name)
        found[name] = path
    return found


def spec_of(files: dict[str, Path], **changes: object) -> QemuSpec:
    spec = QemuSpec(
        binary=str(files["qemu-system-x86_64"]),
        accel=Accel.tcg,
        memory_mib=2048,
        vcpus=2,
        kernel=str(files["vmlinuz"]),
        initrd=str(files["initramfs.img"]),
        cmdline="console=ttyS0 root=LABEL=bcvk-x ro panic=-1",
        ssh_port=40022,
        drives=(Drive(str(files["rootfs.ext4"]), "raw", "bcvk-rootfs", readonly=True),),
        console_log="/run/vm1/console.log",
        qmp_fd=5,
        name="vm1",
        control_fd=8,
        vmgenid=True,
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the key


def test_the_key_ignores_what_is_per_vm(files: dict[str, Path]) -> None:
    key = warm.snapshot_key(spec_of(files))
    per_vm = spec_of(
        files,
        ssh_port=41234,
        forwards=(PortForward(8080, 80),),
        console_log="/run/vm2/console.log",
        qmp_fd=7,
        name="vm2",
        smbios=("io.systemd.credential.binary:tmpfiles.extra=eA==",),
        control_fd=9,
        incoming_fd=3,
    )
    assert warm.snapshot_key(per_vm) == key


@pytest.mark.parametrize(
    "change",
    [
        {"memory_mib": 4096},
        {"vcpus": 1},
        {"accel": Accel.kvm},
        {"cmdline": "console=ttyS0 root=LABEL=bcvk-x ro panic=-1 quiet"},
        {"initrd": None},
    ],
)
def test_a_changed_machine_gets_another_key(
    files: dict[str, Path], change: dict[str, object]
) -> None:
    assert warm.snapshot_key(spec_of(files, **change)) != warm.snapshot_key(spec_of(files))


@pytest.mark.parametrize("name", ["qemu-system-x86_64", "vmlinuz", "initramfs.img", "rootfs.ext4"])
def test_a_changed_file_gets_another_key(files: dict[str, Path], name: str) -> None:
    before = warm.snapshot_key(spec_of(files))
    files[name].write_text(name + " rebuilt")
    assert warm.snapshot_key(spec_of(files)) != before


def test_another_bcvk_version_gets_another_key(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = warm.snapshot_key(spec_of(files))
    monkeypatch.setattr("bcvk.__version__", "99.0")
    assert warm.snapshot_key(spec_of(files)) != before


# ---------------------------------------------------------------- the plan


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"warm": "off"}, "--warm off"),
        ({"binds": ["/tmp:data"]}, "--bind/--ro-bind shares cannot be restored"),
        ({"disks": ["/tmp/x.img"]}, "--mount-disk-file disks cannot be restored"),
        ({"add_swap": "1G"}, "--add-swap cannot be restored"),
        ({"console": True}, "--console shows the boot"),
        ({"rootfs": "virtiofs"}, "a virtiofs root cannot be restored"),
    ],
)
def test_what_cannot_start_warm_says_why(kwargs: dict[str, object], reason: str) -> None:
    opts = make_options(IMAGE, **kwargs)  # type: ignore[arg-type]
    found = warm.option_reason(opts)
    assert found is not None
    assert found.startswith(reason)
    plan = warm.plan(opts, found, None)
    assert (plan.mode, plan.warm_devices) == ("cold", False)
    assert plan.message() == f"cold boot: {found}"


def test_forced_key_routes_boot_cold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BCVK_SSH_KEY_ROUTES", "cmdline")
    assert (
        warm.option_reason(make_options(IMAGE)) == "BCVK_SSH_KEY_ROUTES chooses how the key gets in"
    )


def snapshot_in(tmp_path: Path, key: str = "k" * 32) -> cache.Snapshot:
    entry = cache.Entry(tmp_path / "entry")
    entry.warm.mkdir(parents=True)
    return cache.Snapshot(entry, key)


def write_snapshot(snap: cache.Snapshot, data: bytes = b"state" * 100) -> None:
    snap.state.write_bytes(data)
    snap.meta.write_text(json.dumps({"key": snap.key, "size": len(data), "created": 1.0}))


def test_no_snapshot_boots_cold_and_saves(tmp_path: Path) -> None:
    snap = snapshot_in(tmp_path)
    plan = warm.plan(make_options(IMAGE), None, snap)
    assert (plan.mode, plan.reason, plan.warm_devices) == ("save", "no snapshot yet", True)
    assert plan.message() == "cold boot: no snapshot yet; saving a snapshot once SSH answers"


def test_a_complete_snapshot_is_restored(tmp_path: Path) -> None:
    snap = snapshot_in(tmp_path)
    write_snapshot(snap)
    plan = warm.plan(make_options(IMAGE), None, snap)
    assert plan.mode == "restore"
    assert plan.message() == f"warm start: restoring snapshot {'k' * 12}"


def test_a_detached_vm_restores_but_never_saves(tmp_path: Path) -> None:
    snap = snapshot_in(tmp_path)
    plan = warm.plan(make_options(IMAGE, detach=True), None, snap)
    assert (plan.mode, plan.warm_devices) == ("cold", False)
    assert "a detached VM does not save one" in plan.reason
    write_snapshot(snap)
    assert warm.plan(make_options(IMAGE, detach=True), None, snap).mode == "restore"


def test_refresh_removes_the_snapshot_and_saves_anew(tmp_path: Path) -> None:
    snap = snapshot_in(tmp_path)
    write_snapshot(snap)
    plan = warm.plan(make_options(IMAGE, warm="refresh"), None, snap)
    assert (plan.mode, plan.reason) == ("save", "--warm refresh")
    assert not snap.state.exists()
    assert not snap.meta.exists()


def test_refresh_on_a_cache_that_never_held_a_snapshot(tmp_path: Path) -> None:
    # A fresh user's first `--warm refresh`: no warm/ directory to lock in yet.
    snap = cache.Snapshot(cache.Entry(tmp_path / "entry"), "k" * 32)
    plan = warm.plan(make_options(IMAGE, warm="refresh"), None, snap)
    assert (plan.mode, plan.reason) == ("save", "--warm refresh")
    assert not snap.lock.exists()


@pytest.mark.parametrize("damage", ["truncated", "no-meta", "other-key"])
def test_an_incomplete_snapshot_is_removed_and_replaced(tmp_path: Path, damage: str) -> None:
    snap = snapshot_in(tmp_path)
    write_snapshot(snap)
    if damage == "truncated":
        snap.state.write_bytes(b"state")
    elif damage == "no-meta":
        snap.meta.unlink()
    else:
        snap.meta.write_text(json.dumps({"key": "other", "size": 500}))
    plan = warm.plan(make_options(IMAGE), None, snap)
    assert (plan.mode, plan.reason) == ("save", "the snapshot was incomplete")
    assert not snap.state.exists()


def test_a_snapshot_being_saved_is_left_alone(tmp_path: Path) -> None:
    from bcvk import paths

    snap = snapshot_in(tmp_path)
    snap.state.write_bytes(b"half")
    with paths.locked(snap.lock):
        plan = warm.plan(make_options(IMAGE), None, snap)
    assert plan.reason == "the snapshot is being saved by another VM"
    assert snap.state.exists()


def test_warm_mode_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_options(IMAGE).warm is WarmMode.auto
    monkeypatch.setenv("BCVK_WARM", "off")
    assert make_options(IMAGE).warm is WarmMode.off
    assert make_options(IMAGE, warm="refresh").warm is WarmMode.refresh
    monkeypatch.setenv("BCVK_WARM", "sometimes")
    with pytest.raises(UsageError, match="invalid BCVK_WARM 'sometimes'"):
        make_options(IMAGE)
    with pytest.raises(UsageError, match="invalid --warm 'hot'"):
        make_options(IMAGE, warm="hot")


# ---------------------------------------------------------------- the guest's text


def test_prepare_script(golden: Callable[[str, str], None]) -> None:
    script = guest.prepare_script(KEY)
    assert guest.AGENT in script
    # The agent is a constant of the source; the golden file pins what is
    # rendered around it.
    golden("ephemeral/warm-prepare.sh", script.replace(guest.AGENT, "<AGENT>\n"))
    for text in (script, guest.AGENT):
        assert subprocess.run(["sh", "-n"], input=text, text=True, check=False).returncode == 0


def test_hand_in_lines() -> None:
    lines = guest.hand_in_lines(KEY, 1764650000.25, "vm-2").decode().splitlines()
    assert lines == [f"key {KEY}", "hostname vm-2", "clock 1764650000.250", "go"]


@pytest.mark.parametrize(
    "bad",
    [KEY + "\nkey ssh-ed25519 AAAA evil", "ssh-ed25519 AAAA; reboot", "", "not a key"],
)
def test_only_a_key_line_goes_to_the_guest(bad: str) -> None:
    with pytest.raises(ValueError, match="not an SSH public key line"):
        guest.hand_in_lines(bad, 0.0, "vm")
    with pytest.raises(ValueError, match="not an SSH public key line"):
        guest.prepare_script(bad)


@pytest.mark.parametrize("bad", ["-vm", "vm name", "vm\ngo", "x" * 64])
def test_only_a_vm_name_becomes_the_hostname(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid hostname"):
        guest.hand_in_lines(KEY, 0.0, bad)


class FakeAgent:
    """A unix socket standing in for QEMU's end of the control port."""

    def __init__(self, path: Path, answer: bytes | None) -> None:
        self.got = b""
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen()
        self.answer = answer
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            while b"go\n" not in self.got:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                self.got += chunk
            if self.answer is not None:
                conn.sendall(self.answer)


class FakeVm:
    def __init__(self, directory: Path) -> None:
        from bcvk.ephemeral import registry

        self.dir = registry.VmDir(directory)
        self.name = "vm-2"


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"ok\n", None),
        (b"no\n", "the guest's agent answered b'no\\n'"),
        (None, "the control port closed"),
    ],
)
def test_hand_in_waits_for_the_agents_ok(
    tmp_path: Path, answer: bytes | None, error: str | None
) -> None:
    agent = FakeAgent(tmp_path / "ctl.sock", answer)
    vm = FakeVm(tmp_path)
    if error is None:
        warm.hand_in(vm, KEY, timeout=5)  # type: ignore[arg-type]
        assert agent.got.startswith(f"key {KEY}\nhostname vm-2\nclock ".encode())
        assert agent.got.endswith(b"\ngo\n")
    else:
        with pytest.raises(warm.Unusable, match=error.replace("(", r"\(").replace("\\n", "\\\\n")):
            warm.hand_in(vm, KEY, timeout=5)  # type: ignore[arg-type]


def test_a_restore_queues_the_key_runs_the_vm_then_sends_the_clock(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "ctl.sock", b"ok\n")
    seen: list[bytes] = []
    warm.hand_in(
        FakeVm(tmp_path),  # type: ignore[arg-type]
        KEY,
        timeout=5,
        resume=lambda: seen.append(agent.got),
    )
    assert b"clock" not in b"".join(seen)
    assert agent.got.endswith(b"\ngo\n")


def test_hand_in_without_a_control_socket_is_unusable(tmp_path: Path) -> None:
    with pytest.raises(warm.Unusable, match="no control socket"):
        warm.hand_in(FakeVm(tmp_path), KEY, timeout=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the cache


def test_snapshots_are_listed_sized_and_pruned(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = cache.entry_for("sha256:" + "ab" * 32)
    entry.path.mkdir(parents=True)
    (entry.path / cache.META).write_text(json.dumps({"image": IMAGE}))
    entry.touch()
    old, new = cache.Snapshot(entry, "o" * 32), cache.Snapshot(entry, "n" * 32)
    entry.warm.mkdir()
    write_snapshot(old, b"x" * 8192)
    write_snapshot(new, b"y" * 8192)
    os.utime(old.meta, (1.0, 1.0))
    monkeypatch.setattr(cache, "_present_ids", lambda: {entry.image_id})
    [info] = cache.describe()
    assert {s.key for s in info.snapshots} == {old.key, new.key}
    assert info.size >= 2 * 8192
    assert info.to_json()["snapshots"] == [s.to_json() for s in info.snapshots]
    dry = cache.prune(older_than_days=30, everything=False, dry_run=True)
    assert [(r.only_snapshots, [s.key for s in r.snapshots]) for r in dry] == [(True, [old.key])]
    assert old.state.exists()
    cache.prune(older_than_days=30, everything=False, dry_run=False)
    assert not old.state.exists()
    assert not old.meta.exists()
    assert new.state.exists()
    assert entry.rootfs.parent.exists()
    cache.prune(older_than_days=None, everything=True, dry_run=False)
    assert not entry.path.exists()


def test_cache_list_shows_snapshots(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bcvk.__main__ import main

    entry = cache.entry_for("sha256:" + "cd" * 32)
    entry.path.mkdir(parents=True)
    entry.warm.mkdir()
    write_snapshot(cache.Snapshot(entry, "s" * 32), b"z" * (3 << 20))
    monkeypatch.setattr(cache, "_present_ids", lambda: {entry.image_id})
    assert main(["cache", "list"]) == 0
    table = capsys.readouterr().out
    assert "SNAPSHOTS" in table
    assert " 1 (3" in table
    assert main(["cache", "list", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["snapshots"][0]["key"] == "s" * 32


class SavingVm(FakeVm):
    """A VM whose SSH always works (the prepare script 'runs')."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.scripts: list[str] = []

    def ssh(self, command: str, **_: object) -> subprocess.CompletedProcess[str]:
        self.scripts.append(command)
        return subprocess.CompletedProcess([], 0, "", "")


def test_a_failed_save_leaves_nothing_and_gives_the_key_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from bcvk.host import qmp

    snap = snapshot_in(tmp_path)
    stale = snap.entry.warm / f".{snap.key}.4242.tmp"  # a SIGKILLed saver's
    stale.write_bytes(b"half")
    handed: list[str] = []

    def full_disk(path: Path, fd: int, **_: object) -> dict[str, object]:
        os.write(fd, b"partial state")
        raise qmp.MigrationError("No space left on device")

    monkeypatch.setattr(qmp, "save_state", full_disk)
    monkeypatch.setattr(warm, "hand_in", lambda vm, key: handed.append(key))
    vm = SavingVm(tmp_path)
    warm.save(vm, snap, KEY, IMAGE)  # type: ignore[arg-type]
    assert vm.scripts == [guest.prepare_script(KEY)]
    assert handed == [KEY]
    assert "could not save a warm-start snapshot: No space left on device" in caplog.text
    assert list(snap.entry.warm.iterdir()) == []  # the lock file goes with its lock


def test_a_save_writes_state_then_its_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bcvk.host import qmp

    snap = snapshot_in(tmp_path)

    def saved(path: Path, fd: int, **_: object) -> dict[str, object]:
        os.write(fd, b"QEVM" + b"\0" * 1000)
        return {"status": "completed"}

    monkeypatch.setattr(qmp, "save_state", saved)
    monkeypatch.setattr(warm, "hand_in", lambda vm, key: None)
    warm.save(SavingVm(tmp_path), snap, KEY, IMAGE)  # type: ignore[arg-type]
    assert snap.usable()
    assert (snap.state.stat().st_mode & 0o777, snap.meta.stat().st_mode & 0o777) == (0o600, 0o600)
    assert json.loads(snap.meta.read_text())["image"] == IMAGE
    # Saved already: a second first VM does not save again.
    vm = SavingVm(tmp_path)
    warm.save(vm, snap, KEY, IMAGE)  # type: ignore[arg-type]
    assert vm.scripts == []


def test_two_first_vms_save_one_snapshot(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bcvk import paths

    snap = snapshot_in(tmp_path)
    vm = SavingVm(tmp_path)
    with paths.locked(snap.lock):  # the other first VM is saving
        warm.save(vm, snap, KEY, IMAGE)  # type: ignore[arg-type]
    assert vm.scripts == []  # this one keeps its key and goes on
    assert "another VM has saved or is saving it" in caplog.text


def test_the_roms_qemu_loads_are_part_of_the_key(files: dict[str, Path], tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "share" / "qemu").mkdir(parents=True)
    binary = prefix / "bin" / "qemu-system-x86_64"
    binary.write_text("qemu")
    rom = prefix / "share" / "qemu" / "bios-256k.bin"
    rom.write_text("seabios 1")
    assert qemu.rom_files(str(binary)) == [rom]
    before = warm.snapshot_key(spec_of(files, binary=str(binary)))
    rom.write_text("seabios 2, a new package")
    assert warm.snapshot_key(spec_of(files, binary=str(binary))) != before


class FailingVm(SavingVm):
    def ssh(self, command: str, **_: object) -> subprocess.CompletedProcess[str]:
        self.scripts.append(command)
        return subprocess.CompletedProcess([], 255, "", "Connection reset by peer\n")


def test_a_failed_prepare_is_a_warning_and_the_key_is_handed_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The script may have removed the key before the connection dropped."""
    snap = snapshot_in(tmp_path)
    handed: list[tuple[str, float]] = []

    def hand_in(vm: object, key: str, timeout: float = 60.0) -> None:
        handed.append((key, timeout))
        raise warm.Unusable("no agent")  # it never started: the key is still there

    monkeypatch.setattr(warm, "hand_in", hand_in)
    warm.save(FailingVm(tmp_path), snap, KEY, IMAGE)  # type: ignore[arg-type]
    assert "could not save a warm-start snapshot: Connection reset by peer" in caplog.text
    assert handed == [(KEY, 10)]
    assert list(snap.entry.warm.iterdir()) == []


def test_prune_removes_a_killed_savers_temporary_file(tmp_path: Path) -> None:
    from bcvk import paths

    snap = snapshot_in(tmp_path)
    abandoned = snap.entry.warm / f".{snap.key}.4242.tmp"
    abandoned.write_bytes(b"half a machine")
    other = cache.Snapshot(snap.entry, "b" * 32)
    being_written = snap.entry.warm / f".{other.key}.4343.tmp"
    being_written.write_bytes(b"being written")
    with paths.locked(other.lock, remove=True):
        cache.prune_snapshots(snap.entry, older_than=None, dry_run=False)
    assert not abandoned.exists()
    assert being_written.exists()


def test_a_kvm_snapshot_is_keyed_to_the_host_cpu(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    kvm = spec_of(files, accel=Accel.kvm)
    before = warm.snapshot_key(kvm)
    monkeypatch.setattr(warm, "host_cpu", lambda: "6.1.0:another-cpu")
    assert warm.snapshot_key(kvm) != before
    tcg = warm.snapshot_key(spec_of(files))
    assert warm.snapshot_key(spec_of(files)) == tcg  # TCG emulates its CPU: no host input
