"""Ephemeral VMs booted for real (TCG here): the behaviours upstream's suite checks.

Each test asserts on what the guest reports over SSH or on exit statuses.
VM boots are few and one at a time: one VM started through the Python API is
shared by the option tests (virtiofs transport), plus one boot each for
run-ssh (block transport), poweroff, --execute and a detached VM.
"""

from __future__ import annotations

import json
import secrets
import shlex
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bcvk import ephemeral
from bcvk.ephemeral.options import free_port
from bcvk.host import ssh
from tests import schemas
from tests.conftest import DEMO_IMAGE, image_exists
from tests.integration.ephemeral_support import (
    SSH_TIMEOUT,
    Session,
    mount_counts,
    session_fixture,  # noqa: F401  (fixture)
    unique,
)
from tests.integration.guest_logs import journal, seqnum

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("no_leaks")]


@pytest.fixture(scope="module")
def demo() -> str:
    if not image_exists(DEMO_IMAGE):
        pytest.skip(f"{DEMO_IMAGE} not built (run `make images`)")
    return DEMO_IMAGE


def image_id(ref: str) -> str:
    return subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", ref],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


# ---------------------------------------------------------------- one shared VM


@dataclass
class Shared:
    vm: ephemeral.Vm
    session: Session
    rw: Path
    ro: Path
    logs: Path
    forward: int
    marker: str
    image_id: str


@pytest.fixture(scope="module")
def shared(demo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """A VM started through the Python API with most options at once."""
    work = tmp_path_factory.mktemp("shared")
    rw, ro, logs, run = work / "rw", work / "ro", work / "logs", work / "run"
    for d in (rw, ro, run):
        d.mkdir(mode=0o700)
    (rw / "from-host").write_text("hello from the host\n")
    (ro / "data").write_text("read only data\n")
    token = secrets.token_hex(6)
    session = Session(token=token, runtime=run, mounts_before=mount_counts())
    forward = free_port(set())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_RUNTIME_DIR", str(run))
        mp.setenv("BCVK_TEST_MARK", token)
        vm = ephemeral.start(
            demo,
            name=unique("shared"),
            memory="1536M",
            vcpus=1,
            kargs=["bcvk.test=shared"],
            binds=[f"{rw}:rw"],
            ro_binds=[f"{ro}:ro"],
            disks=[f"{work / 'extra.img'}:extra"],
            ports=[f"{forward}:22"],
            add_swap="256M",
            log_dir=str(logs),
            labels=["team=qa", "bcvk-it"],
            rootfs="virtiofs",
            ssh_timeout=float(SSH_TIMEOUT),
        )
        try:
            yield Shared(vm, session, rw, ro, logs, forward, f"bcvk-{token}", image_id(demo))
        finally:
            vm.stop(graceful=False)


def test_memory_vcpus_and_kargs_are_visible(shared: Shared) -> None:
    out = shared.vm.ssh(
        "nproc; awk '/MemTotal/ {print $2}' /proc/meminfo; cat /proc/cmdline", check=True
    ).stdout.split("\n")
    assert out[0] == "1"
    mem_kib = int(out[1])
    assert 1200 * 1024 < mem_kib <= 1536 * 1024
    assert "bcvk.test=shared" in out[2]
    assert "root=virtiofs:rootfs" in out[2]


def test_mount_layout_is_bootcs(shared: Shared) -> None:
    """Upstream's mount_layout: / read-only virtiofs, /etc an overlay, /var a tmpfs
    (and run_tmpfs: /run a tmpfs);
    writes land in /etc and /var, and overlayfs can be mounted on /var."""
    result = shared.vm.ssh(
        "for m in / /etc /var /run; do findmnt -n -r -o FSTYPE,OPTIONS $m | cut -d, -f1; done; "
        f"echo written > /etc/{shared.marker} && echo written > /var/{shared.marker} && "
        f"cat /etc/{shared.marker} /var/{shared.marker}; "
        "touch /usr/bcvk-nope 2>/dev/null || echo usr-ro; "
        "mkdir -p /var/o/lower /var/o/upper /var/o/work /var/o/merged && "
        "mount -t overlay -o lowerdir=/var/o/lower,upperdir=/var/o/upper,workdir=/var/o/work "
        "nested /var/o/merged && touch /var/o/merged/f && echo nested-ok",
        check=True,
    )
    lines = result.stdout.split("\n")
    assert lines[:4] == ["virtiofs ro", "overlay rw", "tmpfs rw", "tmpfs rw"]  # and run_tmpfs
    assert result.stdout.split()[-4:] == ["written", "written", "usr-ro", "nested-ok"]


# mmap(2) itself, by number: the image has perl but no python3.  x86_64's
# mmap is syscall 9; PROT_READ and MAP_SHARED are both 1.
MMAP_SHARED_READ = (
    "open(my $f, '<', '/usr/lib/os-release') or die \"open: $!\\n\"; "
    "my $a = syscall(9, 0, 4096, 1, 1, fileno($f), 0); "
    'die "mmap: $!\\n" if $a == -1; print "MMAP_SUCCESS\\n"'
)


def test_a_file_of_the_image_can_be_mmapped_shared(shared: Shared) -> None:
    """Upstream's virtiofs_mmap: a shared mapping of a file on the virtiofs root
    (the image is served with --cache always, so the guest may map its pages)."""
    result = shared.vm.ssh(f"perl -e {shlex.quote(MMAP_SHARED_READ)}")
    assert result.stdout == "MMAP_SUCCESS\n", result.stderr


def test_bind_is_shared_both_ways(shared: Shared) -> None:
    mnt = "/run/virtiofs-mnt-rw"
    assert shared.vm.ssh(f"cat {mnt}/from-host", check=True).stdout == "hello from the host\n"
    shared.vm.ssh(f"echo from-guest > {mnt}/from-guest", check=True)
    assert (shared.rw / "from-guest").read_text() == "from-guest\n"
    (shared.rw / "later").write_text("written while mounted\n")
    assert shared.vm.ssh(f"cat {mnt}/later", check=True).stdout == "written while mounted\n"


def test_ro_bind_refuses_writes(shared: Shared) -> None:
    mnt = "/run/virtiofs-mnt-ro"
    assert shared.vm.ssh(f"cat {mnt}/data", check=True).stdout == "read only data\n"
    result = shared.vm.ssh(f"touch {mnt}/nope")
    assert result.returncode != 0
    assert "Read-only file system" in result.stderr
    assert not (shared.ro / "nope").exists()


def test_disk_swap_and_port_forward(shared: Shared) -> None:
    out = shared.vm.ssh(
        "test -b /dev/disk/by-id/virtio-extra && echo disk; awk 'NR > 1 {print $1}' /proc/swaps",
        check=True,
    ).stdout.split()
    assert out[0] == "disk"
    assert len(out) == 2
    # -p HOST:22 reaches the same sshd on another loopback port.
    target = ssh.Target(port=shared.forward, key=shared.vm.key)
    assert ssh.execute(target, ["cat", "/proc/sys/kernel/hostname"]).returncode == 0


def test_log_dir_gets_console_and_journal(shared: Shared) -> None:
    console = (shared.logs / "console.txt").read_text(errors="replace")
    assert "Linux version" in console
    assert any("MESSAGE_ID" in entry for entry in journal(shared.logs / "journal.json"))
    # Upstream's journal_output: the initrd's stream starts at its first entry.
    assert seqnum(journal(shared.logs / "journal-initrd.json")[0]) == 1


def test_listed_by_ps_and_reachable_by_name(shared: Shared) -> None:
    listed = json.loads(shared.session.bcvk("ephemeral", "ps", "--format", "json").stdout)
    schemas.check("ephemeral-ps", listed)
    (entry,) = [e for e in listed if e["name"] == shared.vm.name]
    assert entry["state"] == "running"
    assert entry["rootfs"] == "virtiofs"
    assert entry["ssh_port"] == shared.vm.ssh_port
    assert entry["image"] == DEMO_IMAGE
    assert isinstance(entry["pid"], int)
    # upstream's (podman ps) keys for the same facts
    assert (entry["Names"], entry["State"], entry["Pid"]) == (
        [entry["name"]],
        "running",
        entry["pid"],
    )
    assert {"host_ip": "127.0.0.1", "host_port": entry["ssh_port"], "container_port": 22,
            "protocol": "tcp"} in entry["Ports"]  # fmt: skip
    assert entry["labels"] == ["team=qa", "bcvk-it"]
    assert entry["Labels"] == {"team": "qa", "bcvk-it": ""}
    by_label = shared.session.bcvk("ephemeral", "ps", "--label", "team=qa", "--format", "json")
    assert [e["name"] for e in json.loads(by_label.stdout)] == [shared.vm.name]
    other = shared.session.bcvk("ephemeral", "ps", "--label", "team=dev", "--format", "json")
    assert json.loads(other.stdout) == []
    kept = shared.session.bcvk("ephemeral", "rm-all", "-f", "--label", "team=dev")
    assert (kept.returncode, kept.stdout) == (0, "")
    result = shared.session.bcvk("ephemeral", "ssh", shared.vm.name, "--", "echo", "by name")
    assert (result.returncode, result.stdout) == (0, "by name\n")
    # The seed's alias does the same.
    assert shared.session.bcvk("ssh", shared.vm.name, "true").returncode == 0


def test_scp_both_ways(shared: Shared, tmp_path: Path) -> None:
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "f").write_text("to the guest\n")
    name = shared.vm.name
    put = shared.session.bcvk("ephemeral", "scp", "-r", str(tmp_path / "up"), f"{name}:/var/tmp/")
    assert put.returncode == 0, put.stderr
    assert shared.vm.ssh("cat /var/tmp/up/f", check=True).stdout == "to the guest\n"
    got = shared.session.bcvk("ephemeral", "scp", f"{name}:/etc/hostname", str(tmp_path / "h"))
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "h").read_text() == "bootc\n"
    # scp's own failure is the exit status.
    missing = shared.session.bcvk("ephemeral", "scp", f"{name}:/nonexistent", str(tmp_path))
    assert missing.returncode == 1


def test_guest_reaches_the_host_without_network_isolation(shared: Shared) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        result = shared.vm.ssh(
            f"timeout 10 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}' && echo host-reachable"
        )
    assert result.stdout.strip() == "host-reachable", result.stderr


def test_stop_leaves_nothing_and_the_image_is_unchanged(shared: Shared) -> None:
    shared.vm.stop(graceful=True, timeout=60)
    assert shared.session.leftovers() == []
    assert image_id(DEMO_IMAGE) == shared.image_id
    mnt = subprocess.run(
        ["podman", "image", "mount", DEMO_IMAGE], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        assert not Path(mnt, "etc", shared.marker).exists()
        assert not Path(mnt, "var", shared.marker).exists()
    finally:
        subprocess.run(["podman", "image", "unmount", DEMO_IMAGE], capture_output=True)


# ---------------------------------------------------------------- one boot each


def test_run_ssh_block_exit_status_and_nothing_left(
    demo: str, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The key goes in by the kernel-command-line credential here, proving the
    # fallback route on a real guest (the shared VM uses SMBIOS).
    monkeypatch.setenv("BCVK_SSH_KEY_ROUTES", "cmdline")
    result = session.bcvk(
        "ephemeral", "run-ssh", "--rootfs", "block", "--memory", "1G", "--ssh-timeout",
        SSH_TIMEOUT, demo, "--",
        "findmnt -n -o FSTYPE /; findmnt -n -o FSTYPE /etc; grep -o 'root=LABEL=[^ ]*' "
        "/proc/cmdline; grep -c systemd.set_credential /proc/cmdline; exit 42",
    )  # fmt: skip
    assert result.returncode == 42, result.stderr
    fstype, etc, root, creds = result.stdout.split()
    assert (fstype, etc, creds) == ("ext4", "overlay", "1")
    assert root.startswith("root=LABEL=bcvk-")
    assert session.leftovers() == []


def test_poweroff_karg_exits_cleanly(demo: str, session: Session) -> None:
    result = session.bcvk(
        "ephemeral", "run", "--karg", "systemd.unit=poweroff.target", "--ssh-timeout",
        SSH_TIMEOUT, demo,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "powered off" in result.stderr
    assert session.leftovers() == []


def test_execute_needs_no_ssh_and_streams_the_journal(
    demo: str, session: Session, tmp_path: Path
) -> None:
    """--execute runs in a unit bcvk injects, so it works with sshd masked; the
    journal arrives over virtio-serial too (upstream's execute and journal_output)."""
    logs = tmp_path / "logs"
    result = session.bcvk(
        "ephemeral", "run", "--karg", "systemd.mask=ssh.service",
        "--log-dir", f"journal={logs}",
        "--execute", "echo first; echo to-stderr >&2",
        "--execute", "systemctl is-active ssh.service; echo second; exit 3",
        "--execute", "echo never",
        demo,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert result.stdout.split() == ["first", "inactive", "second"]
    assert "to-stderr" in result.stderr
    entries = journal(logs / "journal.json")
    assert any("MESSAGE_ID" in e for e in entries)
    assert any("ssh.service" in e.get("MESSAGE", "") for e in entries)
    assert seqnum(journal(logs / "journal-initrd.json")[0]) == 1
    assert session.leftovers() == []


def test_masked_sshd_fails_fast_and_names_the_unit(demo: str, session: Session) -> None:
    """Upstream's ssh_timeout waits out 240 s; the guest's boot report says why at once."""
    import time

    began = time.monotonic()
    result = session.bcvk(
        "ephemeral", "run-ssh", "--warm", "off", "--karg", "systemd.mask=ssh.service",
        "--ssh-timeout", SSH_TIMEOUT, demo, "--", "true",
    )  # fmt: skip
    elapsed = time.monotonic() - began
    assert result.returncode == 1
    assert "will not answer SSH: ssh.service is masked" in result.stderr
    assert "--execute" in result.stderr  # the hint: what works without SSH
    assert elapsed < 240, elapsed  # upstream waits its whole 240 s default
    assert session.leftovers() == []


def test_detached_run_ssh_ps_rm(demo: str, session: Session) -> None:
    name = unique("det")
    started = session.bcvk("ephemeral", "run", "-d", "--name", name, demo)
    assert (started.returncode, started.stdout) == (0, f"{name}\n"), started.stderr
    listed = json.loads(session.bcvk("ephemeral", "ps", "--format", "json").stdout)
    assert [(e["name"], e["state"]) for e in listed] == [(name, "running")]
    assert {"name", "image", "state", "ssh_port", "pid", "rootfs"} <= set(listed[0])
    # `ssh` waits for the guest's sshd itself.
    result = session.bcvk(
        "ephemeral", "ssh", "--ssh-timeout", SSH_TIMEOUT, name, "--", "cat", "/etc/hostname"
    )
    assert (result.returncode, result.stdout) == (0, "bootc\n"), result.stderr
    # The name stays taken while the VM runs.
    again = session.bcvk("ephemeral", "run", "-d", "--name", name, demo)
    assert again.returncode == 1
    assert "already exists" in again.stderr
    removed = session.bcvk("ephemeral", "rm", name)
    assert (removed.returncode, removed.stdout) == (0, f"{name}\n"), removed.stderr
    assert json.loads(session.bcvk("ephemeral", "ps", "--format", "json").stdout) == []
    assert session.leftovers() == []


def test_four_vms_at_once_get_distinct_ports(demo: str, session: Session) -> None:
    """Started concurrently (detached; no boot wait): names and ports never collide."""
    procs = [session.popen("ephemeral", "run", "-d", "--rootfs", "block", demo) for _ in range(4)]
    names = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        names.append(out.strip())
    listed = json.loads(session.bcvk("ephemeral", "ps", "--format", "json").stdout)
    assert sorted(e["name"] for e in listed) == sorted(names)
    assert len({e["ssh_port"] for e in listed}) == 4
    answer = session.bcvk("ephemeral", "rm-all", "-f")
    assert answer.returncode == 0
    assert sorted(answer.stdout.split()) == sorted(names)
    assert session.leftovers() == []
